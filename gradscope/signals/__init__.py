"""Signal collectors: each computes statistics on the device and hands them to a DeviceBatch."""
