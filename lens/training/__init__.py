"""The Lightning layer: the only part of the package that imports Lightning."""
