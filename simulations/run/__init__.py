"""Running experiments: configuration, run directories, the vertical and horizontal runs on
Flower's simulation or deployment engine, and privacy-budget sweeps."""
