"""The quick start's demo: a real SN-Net trained end to end on CPU in about a minute.

``data`` turns scikit-learn's 8x8 digits into images, ``train`` trains three ViT anchors,
stitches them with LS init and fine-tunes the stitched network.
"""

from .train import DemoRun, evaluate, train_demo

__all__ = ["DemoRun", "evaluate", "train_demo"]
