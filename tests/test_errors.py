"""Bad input raises a clear error naming the argument, before any communication, and the group
keeps working afterwards."""
import pytest
import torch
import torch.distributed as dist

import torch_ep
from torch_ep import _C, reference
from torch_ep.testing import poison_, same_bits


def _all_to_all_still_works():
    rank, size = dist.get_rank(), dist.get_world_size()
    x = torch.randn(size * 3, 2, generator=torch.Generator().manual_seed(rank))
    y = poison_(torch.empty_like(x))
    dist.all_to_all_single(y, x)
    assert same_bits(y, reference.all_to_all_single(y.shape, x))


def _error_of(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the test inspects whatever was raised
        return type(e).__name__, str(e).split("\n")[0]
    return None


def rank_bad_inputs():
    size = dist.get_world_size()
    x = torch.randn(size * 2, 3)
    y = torch.empty_like(x)
    ones = [2] * size
    cases = {
        "short input_split_sizes": lambda: dist.all_to_all_single(y, x, ones, [2] * (size - 1)),
        "long output_split_sizes": lambda: dist.all_to_all_single(y, x, [2] * (size + 1), ones),
        "negative split": lambda: dist.all_to_all_single(y, x, ones, [-1, 5] + [2] * (size - 2)),
        "splits do not add up": lambda: dist.all_to_all_single(y, x, ones, [3] * size),
        "uneven rows without splits": lambda: dist.all_to_all_single(y[:-1], x[:-1]),
        "dtype mismatch": lambda: dist.all_to_all_single(y.double(), x),
        "row shape mismatch": lambda: dist.all_to_all_single(torch.empty(size * 2, 4), x),
        "list too short": lambda: dist.all_to_all([torch.empty(1)] * size, [torch.empty(1)] * (size - 1)),
        "list dtypes differ": lambda: dist.all_to_all([torch.empty(1)] * size,
                                                     [torch.empty(1, dtype=torch.int32)] + [torch.empty(1)] * (size - 1)),
    }
    errors = {}
    for name, call in cases.items():
        errors[name] = _error_of(call)
        _all_to_all_still_works()  # nothing was sent, so the group is intact
    return errors


EXPECTED = {
    "short input_split_sizes": ("ValueError", "all_to_all_single: input_split_sizes has {n1} entries, expected {n} (one per rank of the group)"),
    "long output_split_sizes": ("ValueError", "all_to_all_single: output_split_sizes has {np1} entries, expected {n} (one per rank of the group)"),
    "negative split": ("ValueError", "all_to_all_single: input_split_sizes[0] is -1, expected a count >= 0"),
    "splits do not add up": ("ValueError", "all_to_all_single: input_split_sizes sum to {n3} but input has {n2} rows (dim 0)"),
    "uneven rows without splits": ("ValueError", "all_to_all_single: input has {n2m1} rows (dim 0), which do not split evenly among {n} ranks; pass input_split_sizes"),
    # torch.distributed's Python layer checks dtypes before the backend sees the call.
    "dtype mismatch": ("ValueError", "Invalid usage of tensors with different dtypesFound torch.float64 and  torch.float32"),
    "row shape mismatch": ("ValueError", "all_to_all_single: output rows hold 4 elements but input rows hold 3; both tensors must have the same shape after dim 0"),
    "list too short": ("ValueError", "all_to_all: input_tensor_list has {n1} tensors, expected {n} (one per rank of the group)"),
    "list dtypes differ": ("ValueError", "Invalid usage of tensors with different dtypesFound torch.float32 and  torch.int32"),
}


def test_bad_inputs_raise_before_communication(pool):
    n = pool.world_size
    for rank_errors in pool.run(rank_bad_inputs):
        for case, (kind, template) in EXPECTED.items():
            message = template.format(n=n, n1=n - 1, np1=n + 1, n2=2 * n, n3=3 * n, n2m1=2 * n - 1)
            assert rank_errors[case] == (kind, message), case


def test_wrong_device_is_named():
    # A CPU machine has one real device; the meta device stands in for "another device".
    with pytest.raises(ValueError, match=r"all_to_all_single: input is on meta but output is on cpu; "
                                         r"both must be on one device"):
        _C._check_all_to_all_single(torch.empty(4), torch.empty(4, device="meta"), [], [], 2)


def test_dtype_mismatch_is_named_by_the_backend():
    # Callers that reach the backend without torch.distributed's Python checks (the c10d ops,
    # functional collectives) get the backend's own message.
    with pytest.raises(TypeError, match=r"all_to_all_single: output has dtype Double but input has dtype Float; "
                                        r"they must match"):
        _C._check_all_to_all_single(torch.empty(4, dtype=torch.double), torch.empty(4), [], [], 2)


def test_bad_options():
    with pytest.raises(ValueError, match=r"Options.host_num_slots=0: expected >= 1"):
        torch_ep.Options(host_num_slots=0)
    with pytest.raises(ValueError, match=r"Options.host_slot_bytes=8: expected >= 64"):
        torch_ep.Options(host_slot_bytes=8)


def test_bad_environment(monkeypatch):
    monkeypatch.setenv("TORCH_EP_HOST_NUM_SLOTS", "many")
    with pytest.raises(ValueError, match=r"TORCH_EP_HOST_NUM_SLOTS='many': expected an integer"):
        torch_ep.Options()


def rank_bad_pg_options():
    err = _error_of(lambda: dist.new_group(pg_options={"timeout": 3}))
    _all_to_all_still_works()
    return err


def test_pg_options_of_wrong_type(pool4):
    for err in pool4.run(rank_bad_pg_options):
        assert err == ("TypeError", "pg_options for backend 'ep' must be a torch_ep.Options, got dict")
