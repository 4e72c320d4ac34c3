"""edge-ti: gradient-free textual inversion on onnxruntime + numpy (Fei, Fan, Huang 2023).

    import edge_ti
    model = edge_ti.open_model("sd15-onnx", device="cpu")
    ids = model.tokenize(["a photo of <my-mug>"], edge_ti.load_embedding("my-mug.safetensors"))
    hidden = model.encode_text(["a photo of <my-mug>"], edge_ti.load_embedding("my-mug.safetensors"))
"""
from .embeddings import load_embedding, save_embedding
from .errors import EdgeTIError
from .generate import generate
from .model import Model, open_model
from .train import TrainSettings, train

__all__ = ["open_model", "Model", "load_embedding", "save_embedding", "train", "TrainSettings", "generate",
           "EdgeTIError"]
__version__ = "0.1.0"
