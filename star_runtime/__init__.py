"""STAR's edge runtime: a star-export bundle run with onnxruntime and numpy (no torch).

    from star_runtime import Runtime
    rt = Runtime.load("model.onnx")
    print(rt.conversation(seed=0).reply("I feel lonely since I moved.").text)
"""

from star_runtime.bundle import BundleError
from star_runtime.conversation import Conversation, Reply
from star_runtime.decoding import Generation, Timings
from star_runtime.engine import DeviceError
from star_runtime.runtime import Runtime
from star_runtime.sampling import SamplingParams

__all__ = ["Runtime", "Reply", "Conversation", "Generation", "Timings", "SamplingParams", "BundleError",
           "DeviceError"]
