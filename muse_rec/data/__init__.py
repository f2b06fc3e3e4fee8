"""Everything between files on disk and a `Batch`: layout, feature maps, loader, synth, prepare, download."""
