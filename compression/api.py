"""Compressed communication: codecs, packing many tensors into one buffer, error feedback, and a
quantized all-reduce over torch.distributed.

    codec = get_codec("int8", block_size=256)
    payload = codec.encode(x)                      # 1-D uint8, scales included
    y = codec.decode(payload, x.numel())           # 1-D fp32
    handle = all_reduce(grads, ErrorFeedback(get_codec("fp4")), group=g, async_op=True)
    ...                                            # overlap compute
    handle.wait()                                  # grads now hold the average

The kernels doing the bit work live in `kernels` (Triton on CUDA, a torch reference elsewhere).
"""

from kintsugi.compression.allreduce import AllReduceHandle, AllReducePlan, all_reduce, plan_all_reduce
from kintsugi.compression.codecs import CODEC_NAMES, Codec, get_codec
from kintsugi.compression.error_feedback import ErrorFeedback
from kintsugi.compression.packing import PackMeta, pack, unpack, unpack_into

__all__ = [
    "CODEC_NAMES",
    "Codec",
    "get_codec",
    "ErrorFeedback",
    "PackMeta",
    "pack",
    "unpack",
    "unpack_into",
    "all_reduce",
    "AllReduceHandle",
    "AllReducePlan",
    "plan_all_reduce",
]
