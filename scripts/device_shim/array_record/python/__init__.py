"""A stand-in for the array_record package on the GPU machine (scripts/device_shim/README.md)."""
