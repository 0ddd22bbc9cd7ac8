"""Image folders as training and recalibration read them: the MVTec AD layout (``train/good``,
``test/good``, ``test/<defect>``, ``ground_truth/<defect>``) or a plain folder of good images.

Torch-free (``mnemo recalibrate`` reads folders on the serving side)."""

from __future__ import annotations

from pathlib import Path

from mnemo.imaging import IMAGE_EXTENSIONS

# The folder of normal images under train/ and test/: MVTec AD, MPDD and VisA name it good, BTAD ok.
GOOD_FOLDERS = ("good", "ok")


def image_files(directory: Path) -> list[Path]:
    """The image files directly in ``directory`` (``IMAGE_EXTENSIONS``, any case), sorted by name.

    Hidden names are skipped: an archive made on a Mac holds a ``._NAME.png`` resource fork beside every
    image, with the image's extension and none of its bytes (and a ``.DS_Store``)."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def good_folder(split: Path) -> Path | None:
    """``split``'s folder of normal images (the first of ``GOOD_FOLDERS`` there), None when it has none."""
    return next((split / name for name in GOOD_FOLDERS if (split / name).is_dir()), None)
