"""The FLUX.2 networks: pure torch modules, no file I/O and no pipeline logic."""
