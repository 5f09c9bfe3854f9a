"""Training machinery shared by every trainer: process group, checkpoints, the observer, the phase timer, the loop."""
