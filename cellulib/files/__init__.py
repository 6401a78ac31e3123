"""Files on disk: images in any format as RGB8, image folders, CSV tables, atomic writes.

The layer above :mod:`cellulib.constants`; it knows nothing of cells, models or the book."""

__all__ = ["imageio"]
