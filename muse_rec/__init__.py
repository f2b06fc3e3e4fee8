"""muse_rec: MUSE-style lifelong multimodal user-interest models, trained on TorchRec."""

__version__ = "0.1.0"
