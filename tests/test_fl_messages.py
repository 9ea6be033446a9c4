"""Protocol messages: round trips, sizes, and every malformed input rejected with a named reason."""
import struct
import zlib

import numpy as np
import pytest

from fwdllm.fl import messages as M


def _upload(K=8, nan=False):
    rng = np.random.default_rng(0)
    jv = rng.standard_normal(K).astype(np.float32)
    if nan:
        jv[1] = np.nan
    return M.ClientUpload(round=3, client=17, model_version=4, seeds=np.arange(K, dtype=np.int64) - 3, jvps=jv,
                          num_examples=16, loss=0.69)


@pytest.mark.parametrize("msg", [
    M.RoundStart(round=7, round_seed=-(2**63) + 5, model_version=2, Ks=np.array([64, 256], np.uint32), request=3,
                 lr=0.5),
    M.RoundStart(round=0, round_seed=2**63 - 1, model_version=0, Ks=np.array([1], np.uint32)),
    M.Update(round=7, model_version=3, seeds=np.array([1, -2, 2**62], np.int64),
             coefficients=np.array([0.5, -1.25, 3.0], np.float32), groups=np.array([0, 1, 1], np.uint8)),
    M.Update(round=1, model_version=1),
    _upload(),
    M.ParamsDownload(model_version=9, params=np.linspace(-1, 1, 1001, dtype=np.float32)),
    M.ParamsDownload(model_version=9, params=np.ones(5, np.float32), optimizer_state=np.arange(10, dtype=np.float32)),
    M.DenseUpload(round=2, client=3, model_version=1, delta=np.linspace(0, 1, 77, dtype=np.float32), num_examples=32,
                  loss=0.5),
], ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    data = M.encode(msg)
    back = M.decode(data)
    assert type(back) is type(msg)
    for k, v in vars(msg).items():
        w = getattr(back, k)
        if isinstance(v, np.ndarray):
            assert np.array_equal(v, w) and w.dtype == v.dtype
        elif isinstance(v, float):
            assert w == pytest.approx(v, rel=1e-7)
        else:
            assert w == v


def test_upload_is_a_few_bytes_per_perturbation():
    data = M.encode(_upload(K=64))
    assert len(data) == 4 + 2 + 12 + (4 + 64 * 8) + (4 + 64) + (4 + 64 * 4) + 8 + 4  # 13 bytes per perturbation


def _corrupt(data, i, b):
    d = bytearray(data)
    d[i] = b
    return bytes(d)


def _recrc(body):
    return body + struct.pack("<I", zlib.crc32(body))


def test_malformed_messages_are_rejected_with_reasons():
    good = M.encode(_upload())
    with pytest.raises(M.MessageError, match="bad magic"):
        M.decode(b"XXXX" + good[4:])
    with pytest.raises(M.MessageError, match="unsupported format version 9"):
        M.decode(_recrc(good[:4] + bytes([9]) + good[5:-4]))
    with pytest.raises(M.MessageError, match="unknown message type 77"):
        M.decode(_recrc(good[:5] + bytes([77]) + good[6:-4]))
    with pytest.raises(M.MessageError, match="checksum"):
        M.decode(_corrupt(good, 20, good[20] ^ 0xFF))
    with pytest.raises(M.MessageError, match="truncated"):
        M.decode(_recrc(good[:-12]))
    with pytest.raises(M.MessageError, match="trailing bytes"):
        M.decode(_recrc(good[:-4] + b"\0\0"))
    with pytest.raises(M.MessageError, match="too short"):
        M.decode(b"FWDL")
    with pytest.raises(M.MessageError, match="bytes"):
        M.decode("not bytes")
    # a count that claims more items than the message holds
    body = good[:-4]
    off = 6 + 12  # header + round/client/version
    lie = body[:off] + struct.pack("<I", 10**6) + body[off + 4:]
    with pytest.raises(M.MessageError, match="seeds declares 1000000 items"):
        M.decode(_recrc(lie))


def test_semantic_validation():
    with pytest.raises(M.MessageError, match="NaN or Inf"):
        M.decode(M.encode(_upload(nan=True)))
    assert np.isnan(M.decode(M.encode(_upload(nan=True)), validate=False).jvps[1])
    up = _upload()
    up.jvps = up.jvps[:5]
    with pytest.raises(M.MessageError, match="8 seeds, 8 groups, 5 jvps"):
        M.decode(M.encode(up))
    with pytest.raises(M.MessageError, match="expected K = 4"):
        _upload().validate(expect_K=4)
    with pytest.raises(M.MessageError, match="Ks must list"):
        M.decode(M.encode(M.RoundStart(1, 1, 1, np.array([0], np.uint32))))
    with pytest.raises(M.MessageError, match="round must be an integer"):
        M.encode(M.RoundStart(-1, 1, 1, np.array([1], np.uint32)))
    with pytest.raises(M.MessageError, match="delta has 77 values, expected 78"):
        M.DenseUpload(1, 1, 1, np.zeros(77, np.float32), 4, 0.1).validate(expect_numel=78)
    with pytest.raises(M.MessageError, match="DenseUpload.delta"):
        M.decode(M.encode(M.DenseUpload(1, 1, 1, np.array([np.inf], np.float32), 4, 0.1)))
    with pytest.raises(M.MessageError, match="not a protocol message"):
        M.encode(object())
    with pytest.raises(M.MessageError, match="1-D"):
        M.encode(M.ParamsDownload(1, np.zeros((2, 2), np.float32)))
