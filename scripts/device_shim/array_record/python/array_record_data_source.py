"""What grain imports from array_record when it is imported (scripts/device_shim/README.md)."""

from typing import Any

PathLikeOrFileInstruction = Any


class ArrayRecordDataSource:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            "array_record is not installed here: scripts/device_shim stands in for it, and the "
            "GPU training run reads no ArrayRecord files"
        )
