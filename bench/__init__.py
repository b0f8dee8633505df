"""trickbench: measure what deep-learning training tricks cost and buy on your model and hardware."""
__version__ = "0.1.0"
