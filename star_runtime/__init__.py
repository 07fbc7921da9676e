"""STAR's edge runtime: a star-export bundle run with onnxruntime and numpy (no torch).

    from star_runtime import Runtime
    rt = Runtime.load()                     # the default bundle; or Runtime.load("model.onnx")
    print(rt.conversation(seed=0).reply("I feel lonely since I moved.").text)
"""

from star_runtime.bundle import BundleError
from star_runtime.cli import version as _version
from star_runtime.conversation import Conversation, Reply, ReplyStream
from star_runtime.decoding import Generation, NonFiniteOutputError, Timings
from star_runtime.engine import DeviceError
from star_runtime.runtime import Runtime, default_bundle
from star_runtime.safety import SafetyConfigError, SafetyPolicy, SafetyVerdict
from star_runtime.sampling import DecodingOptions

__version__ = _version()

__all__ = ["Runtime", "Reply", "ReplyStream", "Conversation", "Generation", "Timings", "DecodingOptions", "BundleError",
           "DeviceError", "NonFiniteOutputError", "SafetyPolicy", "SafetyVerdict", "SafetyConfigError",
           "default_bundle", "__version__"]
