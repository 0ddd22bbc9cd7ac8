"""Memory modules: each maps a batch of query vectors [n, D] to (read-out [n, D], addressing weights)."""

from mnemo.models.memory.blockwise import BlockwiseMemory as BlockwiseMemory
from mnemo.models.memory.hopfield import HopfieldMemory as HopfieldMemory
from mnemo.models.memory.memae import MemAEMemory
from mnemo.models.memory.memorizer import MultiRoundMemory
from mnemo.models.memory.rftm import ForgettingMemory, TwinMemory

__all__ = ["ForgettingMemory", "MemAEMemory", "MultiRoundMemory", "TwinMemory"]
