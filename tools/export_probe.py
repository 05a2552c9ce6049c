"""What an export costs: cuPointerGetAttributes and cudaIpcGetMemHandle on torch tensors, with the
GPU idle and with it busy (a queue of matmuls ahead of the host), in microseconds per call.

MoE dispatch/combine export every input tensor on every call (backend/transport/cuda:
export_allocation). tools/moe_profile.py showed that phase taking 5 us in one op and 70 us in
another; this tells whether the driver query itself is the slow part.

    python tools/export_probe.py
"""
import ctypes
import time

import torch

CU_POINTER_ATTRIBUTE_BUFFER_ID = 7
CU_POINTER_ATTRIBUTE_RANGE_START_ADDR = 11


def main():
    torch.cuda.init()  # loads the runtime, which the soname below then finds
    cuda = ctypes.CDLL("libcuda.so.1")
    cudart = ctypes.CDLL(f"libcudart.so.{torch.version.cuda.split('.')[0]}")
    attrs = (ctypes.c_int * 2)(CU_POINTER_ATTRIBUTE_BUFFER_ID, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR)
    buffer_id, base = ctypes.c_ulonglong(), ctypes.c_ulonglong()
    values = (ctypes.c_void_p * 2)(ctypes.addressof(buffer_id), ctypes.addressof(base))
    handle = ctypes.create_string_buffer(64)

    def query(ptr):
        assert cuda.cuPointerGetAttributes(2, attrs, values, ctypes.c_ulonglong(ptr)) == 0

    def ipc(ptr):
        assert cudart.cudaIpcGetMemHandle(handle, ctypes.c_void_p(base.value)) == 0

    tensors = {
        "small (64 KiB)": torch.empty(64 << 10, dtype=torch.uint8, device="cuda"),
        "large (117 MiB)": torch.empty(117 << 20, dtype=torch.uint8, device="cuda"),
    }
    a = torch.randn(8192, 8192, device="cuda")
    for busy in (False, True):
        for name, t in tensors.items():
            torch.cuda.synchronize()
            if busy:
                for _ in range(50):
                    a @ a  # about 50 ms of queued work: the host runs ahead of the device
            for what, fn in (("cuPointerGetAttributes", query), ("cudaIpcGetMemHandle", ipc)):
                query(t.data_ptr())
                start = time.perf_counter()
                for _ in range(200):
                    fn(t.data_ptr())
                print(f"{what:24s} {name:16s} GPU {'busy' if busy else 'idle'}: "
                      f"{(time.perf_counter() - start) / 200 * 1e6:8.2f} us/call", flush=True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
