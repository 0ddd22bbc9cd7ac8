"""Memory modules: each maps a batch of query vectors [n, D] to (read-out [n, D], addressing weights)."""

from models.memory.blockwise import BlockwiseMemory as BlockwiseMemory
from models.memory.hopfield import HopfieldMemory as HopfieldMemory
from models.memory.memae import MemAEMemory
from models.memory.memorizer import MultiRoundMemory
from models.memory.rftm import ForgettingMemory, TwinMemory

__all__ = ["ForgettingMemory", "MemAEMemory", "MultiRoundMemory", "TwinMemory"]
