"""Ed25519 verification, in pure Python and by the system's OpenSSL: RFC 8032's vectors, the cryptography
package, forgeries, points of small order, and both verifiers compared on many random inputs."""

from __future__ import annotations

import hashlib
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import ed25519, ed25519_openssl

# RFC 8032, section 7.1: (secret key, public key, message, signature), all hex.
TEST_1 = (
    "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
    "",
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
)
TEST_2 = (
    "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
    "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
    "72",
    "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
)
TEST_3 = (
    "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
    "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
    "af82",
    "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
)
MESSAGE_1023 = (
    "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98"
    "fa6e264bf09efe12ee50f8f54e9f77b1e355f6c50544e23fb1433ddf73be84d8"
    "79de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a1b270b20329d"
    "658675fc6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc"
    "1a858efcb8550ee3a5e1998bd177e93a7363c344fe6b199ee5d02e82d522c4fe"
    "ba15452f80288a821a579116ec6dad2b3b310da903401aa62100ab5d1a36553e"
    "06203b33890cc9b832f79ef80560ccb9a39ce767967ed628c6ad573cb116dbef"
    "efd75499da96bd68a8a97b928a8bbc103b6621fcde2beca1231d206be6cd9ec7"
    "aff6f6c94fcd7204ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed1"
    "85ce81bd84359d44254d95629e9855a94a7c1958d1f8ada5d0532ed8a5aa3fb2"
    "d17ba70eb6248e594e1a2297acbbb39d502f1a8c6eb6f1ce22b3de1a1f40cc24"
    "554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f270"
    "88d78b7e883c8759d2c4f5c65adb7553878ad575f9fad878e80a0c9ba63bcbcc"
    "2732e69485bbc9c90bfbd62481d9089beccf80cfe2df16a2cf65bd92dd597b07"
    "07e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128ba"
    "b27af87a71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51a"
    "ddd3b75a2b1ae0784504df543af8969be3ea7082ff7fc9888c144da2af58429e"
    "c96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9b47acdb7"
    "51fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c"
    "42f58c30c04aafdb038dda0847dd988dcda6f3bfd15c4b4c4525004aa06eeff8"
    "ca61783aacec57fb3d1f92b0fe2fd1a85f6724517b65e614ad6808d6f6ee34df"
    "f7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401adebf5a7e08"
    "d78ff4ef5d63653a65040cf9bfd4aca7984a74d37145986780fc0b16ac451649"
    "de6188a7dbdf191f64b5fc5e2ab47b57f7f7276cd419c17a3ca8e1b939ae49e4"
    "88acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d5011fd2dcc5600a3"
    "2ef5b52a1ecc820e308aa342721aac0943bf6686b64b2579376504ccc493d97e"
    "6aed3fb0f9cd71a43dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5f"
    "b93246f6b1116398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b5"
    "0d334ba77c225bc307ba537152f3f1610e4eafe595f6d9d90d11faa933a15ef1"
    "369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380d"
    "b2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c"
    "0618983f8741c5ef68d3a101e8a3b8cac60c905c15fc910840b94c00a0b9d0"
)
TEST_1024 = (
    "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
    "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
    MESSAGE_1023,
    "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03",
)
RFC_VECTORS = {"TEST 1": TEST_1, "TEST 2": TEST_2, "TEST 3": TEST_3, "TEST 1024": TEST_1024}


def unhex(vector):
    return tuple(bytes.fromhex(part) for part in vector)


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def flip_bit(data: bytes, bit: int) -> bytes:
    changed = bytearray(data)
    changed[bit // 8] ^= 1 << (bit % 8)
    return bytes(changed)


def openssl_verifier() -> ed25519_openssl.OpenSSLVerifier:
    """The agent's OpenSSL verifier; the test is skipped without one, and fails under CI=true, whose
    machines have the libcrypto Python's ssl module links."""
    fast, why = ed25519_openssl.load()
    if fast is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no OpenSSL verifier ({why}); under CI=true both verifiers must be tested")
        pytest.skip(f"no OpenSSL verifier: {why}")
    return fast


@pytest.fixture(params=["pure Python", "OpenSSL alone", "the agent's OpenSSL then pure Python"])
def verify(request):
    """Each verifier the agent may use: ed25519.verify; libcrypto's answer with the key and S checks
    (no fallback, so a broken OpenSSL path cannot hide behind the pure one); and what the agent calls."""
    if request.param == "pure Python":
        return ed25519.verify
    fast = openssl_verifier()
    return fast.openssl_accepts if request.param == "OpenSSL alone" else fast.verify


@pytest.mark.parametrize("name", RFC_VECTORS)
def test_the_rfc_8032_vectors_verify(name, verify):
    _, public, message, signature = unhex(RFC_VECTORS[name])
    assert verify(public, message, signature)


@pytest.mark.parametrize("name", RFC_VECTORS)
def test_the_typed_vectors_are_the_rfcs(name):
    """The vectors above were typed in: the cryptography package checks they hold no typo."""
    secret, public, message, signature = unhex(RFC_VECTORS[name])
    key = Ed25519PrivateKey.from_private_bytes(secret)
    assert (raw_public(key), key.sign(message)) == (public, signature)
    assert len(message) == {"TEST 1": 0, "TEST 2": 1, "TEST 3": 2, "TEST 1024": 1023}[name]


@pytest.mark.parametrize("name", RFC_VECTORS)
def test_a_changed_rfc_vector_fails(name, verify):
    _, public, message, signature = unhex(RFC_VECTORS[name])
    assert not verify(public, message + b"\0", signature)
    assert not verify(public, message, flip_bit(signature, 3))
    assert not verify(flip_bit(public, 9), message, signature)


def test_the_base_point_encodes_as_the_rfc_says():
    assert ed25519.encode_point(ed25519.BASE) == bytes.fromhex("58" + "66" * 31)


def test_the_written_out_constants_are_the_computed_ones():
    p = ed25519.P
    assert ed25519.D == (-121665 * pow(121666, p - 2, p)) % p
    assert ed25519._SQRT_MINUS_ONE == pow(2, (p - 1) // 4, p) and pow(ed25519._SQRT_MINUS_ONE, 2, p) == p - 1
    y = (4 * pow(5, p - 2, p)) % p  # B: y = 4/5, x even (RFC 8032, section 5.1)
    x = ed25519._recover_x(y)
    assert x is not None
    x = p - x if x & 1 else x
    assert ed25519.BASE == (x, y, 1, (x * y) % p)


def test_signatures_by_the_cryptography_package_verify(verify):
    rng = random.Random(8032)
    for size in [0, 1, 31, 32, 33, 64, 200, 1000, 5000] + [rng.randrange(0, 3000) for _ in range(30)]:
        key = Ed25519PrivateKey.generate()
        message = os.urandom(size)
        assert verify(raw_public(key), message, key.sign(message)), size


def test_tampered_messages_signatures_and_keys_fail(verify):
    rng = random.Random(25519)
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    message = os.urandom(100)
    public, signature = raw_public(key), key.sign(message)
    for _ in range(40):
        assert not verify(public, flip_bit(message, rng.randrange(800)), signature)
        assert not verify(public, message, flip_bit(signature, rng.randrange(512)))
        assert not verify(flip_bit(public, rng.randrange(256)), message, signature)
    assert not verify(raw_public(other), message, signature)
    assert not verify(public, message, other.sign(message))
    assert not verify(public, message + b"x", signature)
    assert not verify(public, message[:-1], signature)


def test_a_non_canonical_s_is_refused(verify):
    """S + L signs the same as S in the group; RFC 8032 requires S < L, so it must fail."""
    key = Ed25519PrivateKey.generate()
    message = b"pay 10"
    signature = key.sign(message)
    s = int.from_bytes(signature[32:], "little")
    assert verify(raw_public(key), message, signature)
    assert not verify(raw_public(key), message, signature[:32] + (s + ed25519.L).to_bytes(32, "little"))
    assert not verify(raw_public(key), message, signature[:32] + b"\xff" * 32)


def test_bad_point_encodings_are_refused(verify):
    non_canonical_y = (ed25519.P + 1).to_bytes(32, "little")  # y = 1 + p: the identity, encoded wrongly
    too_big = b"\xff" * 31 + b"\x7f"  # y = 2^255 - 1 >= p
    negative_zero = (1 | 1 << 255).to_bytes(32, "little")  # y = 1 (x = 0) with the sign bit set
    not_on_curve = next(y.to_bytes(32, "little") for y in range(2, 100) if ed25519.decode_point(
        y.to_bytes(32, "little")) is None)
    for encoding in (non_canonical_y, too_big, negative_zero, not_on_curve):
        assert ed25519.decode_point(encoding) is None, encoding.hex()
        assert not verify(encoding, b"m", bytes(64))
    assert ed25519.decode_point((1).to_bytes(32, "little")) == (0, 1, 1, 0)


def test_a_signature_whose_r_is_not_a_point_fails(verify):
    key = Ed25519PrivateKey.generate()
    signature = key.sign(b"m")
    assert not verify(raw_public(key), b"m", b"\xff" * 31 + b"\x7f" + signature[32:])


def test_decoding_round_trips_valid_points():
    for _ in range(20):
        public = raw_public(Ed25519PrivateKey.generate())
        point = ed25519.decode_point(public)
        assert point is not None and ed25519.encode_point(point) == public


@pytest.mark.parametrize("public, message, signature", [
    (None, b"m", bytes(64)),
    ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", b"", bytes(64)),
    (bytes(32), "text", bytes(64)),
    (bytes(32), b"m", None),
    (bytes(31), b"m", bytes(64)),
    (bytes(33), b"m", bytes(64)),
    (bytes(32), b"m", bytes(63)),
    (bytes(32), b"m", bytes(65)),
    (12, 34, 56),
])
def test_bad_input_gives_false_and_never_raises(public, message, signature, verify):
    assert verify(public, message, signature) is False


def test_bytearray_and_memoryview_inputs_verify(verify):
    _, public, message, signature = unhex(TEST_2)
    assert verify(bytearray(public), memoryview(message), bytearray(signature))


def test_a_verification_takes_well_under_50_ms():
    key = Ed25519PrivateKey.generate()
    message = os.urandom(300)
    public, signature = raw_public(key), key.sign(message)
    times = []
    for _ in range(30):
        start = time.perf_counter()
        assert ed25519.verify(public, message, signature)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"ed25519.verify: median {median * 1000:.2f} ms over {len(times)} runs")
    assert median < 0.050


def test_more_keys_than_the_table_cache_holds_all_verify_and_the_cache_stays_bounded():
    keys = [Ed25519PrivateKey.generate() for _ in range(ed25519.MAX_KEY_TABLES + 3)]
    for _ in range(2):  # the second pass finds the first keys' tables evicted
        for key in keys:
            assert ed25519.verify(raw_public(key), b"job", key.sign(b"job"))
            assert not ed25519.verify(raw_public(key), b"job", keys[0 if key is not keys[0] else 1].sign(b"job"))
    assert len(ed25519._KEY_TABLES) <= ed25519.MAX_KEY_TABLES


def _double_and_add(point, n):
    """[n]point the slow, obvious way: the reference for the tables."""
    result = (0, 1, 1, 0)
    for bit in reversed(range(n.bit_length())):
        result = ed25519._double(result)
        if n >> bit & 1:
            result = ed25519._add(result, point)
    return result


def _same_point(one, other):
    return ed25519.encode_point(one) == ed25519.encode_point(other)


def test_the_signed_digit_tables_multiply_as_double_and_add_does():
    """Every digit value, both signs, the carry out of the top digit, and a start point added."""
    rng = random.Random(8032)
    point = ed25519.decode_point(bytes.fromhex(TEST_2[1]))
    table = ed25519._FixedBase(point)
    scalars = [0, 1, 15, 16, 17, 31, 32, 33, ed25519.L - 1, ed25519.L, 2**252, 2**255, 2**256 - 1,
               int("10" * 52, 2), int("1" * 256, 2) // 3, *(rng.randrange(2**256) for _ in range(20))]
    for n in scalars:
        assert _same_point(table.times(n), _double_and_add(point, n)), n
    start = _double_and_add(ed25519.BASE, 7)
    assert _same_point(table.times(12345, start), ed25519._add(start, _double_and_add(point, 12345)))
    with pytest.raises(ValueError, match="too large"):
        table.times(2**260)


# --- the OpenSSL verifier against the pure-Python one ------------------------------------------

ORDER_8 = "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"  # a point of order 8
SMALL_ORDER = ["01" + "00" * 31, "ec" + "ff" * 30 + "7f", "00" * 32, ORDER_8,
               "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"]  # orders 1, 2, 4, 8, 8


def _times(point, n):
    return ed25519._FixedBase(point).times(n)


def _secret_scalar(seed: bytes) -> int:
    """a of RFC 8032, 5.1.5: the clamped first half of SHA-512(seed)."""
    digest = bytearray(hashlib.sha512(seed).digest()[:32])
    digest[0] &= 248
    digest[31] = (digest[31] & 127) | 64
    return int.from_bytes(digest, "little")


def _signature_with_r_plus(point, seed: bytes, message: bytes) -> bytes:
    """A signature whose R is [r]B + point: [S]B - [k]A - R = -point, so with a point of small order
    it holds in the cofactored equation (RFC 8032's, ed25519.verify's) and not in the cofactorless one."""
    a, r = _secret_scalar(seed), 123456789
    public = ed25519.encode_point(_times(ed25519.BASE, a))
    r_encoded = ed25519.encode_point(ed25519._add(_times(ed25519.BASE, r), point))
    k = int.from_bytes(hashlib.sha512(r_encoded + public + message).digest(), "little") % ed25519.L
    return r_encoded + ((r + k * a) % ed25519.L).to_bytes(32, "little")


def test_the_small_order_points_are_of_small_order():
    for encoded in SMALL_ORDER:
        point = ed25519.decode_point(bytes.fromhex(encoded))
        assert point is not None and ed25519._is_identity(_times(point, 8)), encoded
    assert not ed25519._is_identity(_times(ed25519.decode_point(bytes.fromhex(ORDER_8)), 4))


def test_a_signature_off_by_a_small_order_point_gets_the_pure_python_answer():
    """OpenSSL checks the cofactorless equation and refuses it; the agent answers as ed25519.verify."""
    fast, seed, message = openssl_verifier(), b"\x07" * 32, b"job"
    public = raw_public(Ed25519PrivateKey.from_private_bytes(seed))
    signature = _signature_with_r_plus(ed25519.decode_point(bytes.fromhex(ORDER_8)), seed, message)
    assert ed25519.encode_point(_times(ed25519.BASE, _secret_scalar(seed))) == public
    assert ed25519.verify(public, message, signature)
    assert not fast.openssl_accepts(public, message, signature)
    assert fast.verify(public, message, signature)
    assert not fast.verify(public, message + b"!", signature)


@pytest.mark.parametrize("key", SMALL_ORDER)
@pytest.mark.parametrize("r", SMALL_ORDER)
def test_small_order_keys_and_rs_get_the_pure_python_answer(key, r):
    fast = openssl_verifier()
    for s in (0, 1, ed25519.L - 1):
        public, signature = bytes.fromhex(key), bytes.fromhex(r) + s.to_bytes(32, "little")
        expected = ed25519.verify(public, b"m", signature)
        assert fast.verify(public, b"m", signature) is expected
        assert not fast.openssl_accepts(public, b"m", signature) or expected


def test_a_non_canonical_key_libcrypto_would_take_is_refused():
    """y = p + 1 names the identity; libcrypto decodes it, ed25519.verify refuses it: so must the agent."""
    fast, public = openssl_verifier(), (ed25519.P + 1).to_bytes(32, "little")
    signature = (1).to_bytes(32, "little") + bytes(32)  # R = identity, S = 0: [0]B - [k]I = R
    pkey = fast.lib.EVP_PKEY_new_raw_public_key(ed25519_openssl.EVP_PKEY_ED25519, None, public, 32)
    ctx = fast.lib.EVP_MD_CTX_new()
    try:
        assert fast.lib.EVP_DigestVerifyInit(ctx, None, None, None, pkey) == 1
        assert fast.lib.EVP_DigestVerify(ctx, signature, 64, b"m", 1) == 1  # libcrypto alone takes it
    finally:
        fast.lib.EVP_MD_CTX_free(ctx)
        fast.lib.EVP_PKEY_free(pkey)
    assert not ed25519.verify(public, b"m", signature)
    assert not fast.openssl_accepts(public, b"m", signature) and not fast.verify(public, b"m", signature)


CORRUPTIONS = ["none", "signature bit", "key bit", "message bit", "S + L", "another key's", "random", "R + order 8"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.binary(min_size=32, max_size=32), message=st.binary(max_size=600),
       corruption=st.sampled_from(CORRUPTIONS), where=st.integers(min_value=0, max_value=2**16))
def test_openssl_and_pure_python_agree_on_random_keys_messages_and_corruptions(seed, message, corruption, where):
    fast = openssl_verifier()
    key = Ed25519PrivateKey.from_private_bytes(seed)
    public, signature = raw_public(key), key.sign(message)
    if corruption == "signature bit":
        signature = flip_bit(signature, where % 512)
    elif corruption == "key bit":
        public = flip_bit(public, where % 256)
    elif corruption == "message bit" and message:
        message = flip_bit(message, where % (8 * len(message)))
    elif corruption == "S + L":
        s = int.from_bytes(signature[32:], "little") + ed25519.L
        signature = signature[:32] + s.to_bytes(32, "little")
    elif corruption == "another key's":
        signature = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()).sign(message)
    elif corruption == "random":
        signature = random.Random(where).randbytes(64)
    elif corruption == "R + order 8":
        signature = _signature_with_r_plus(ed25519.decode_point(bytes.fromhex(ORDER_8)), seed, message)
    expected = ed25519.verify(public, message, signature)
    assert expected is (corruption in ("none", "R + order 8") or (corruption == "message bit" and not message))
    assert fast.verify(public, message, signature) is expected
    assert fast.openssl_accepts(public, message, signature) is (expected and corruption != "R + order 8")


def test_the_openssl_verifier_keeps_a_bounded_number_of_keys():
    fast = openssl_verifier()
    keys = [Ed25519PrivateKey.generate() for _ in range(ed25519_openssl.MAX_KEYS + 3)]
    for _ in range(2):
        for key in keys:
            assert fast.openssl_accepts(raw_public(key), b"job", key.sign(b"job"))
    assert len(fast._keys) <= ed25519_openssl.MAX_KEYS


def test_threads_verifying_with_more_keys_than_are_kept_all_get_the_right_answer():
    """Keys are evicted (their EVP_PKEY freed) while other threads verify: none is freed in use."""
    fast = openssl_verifier()
    keys = [Ed25519PrivateKey.generate() for _ in range(ed25519_openssl.MAX_KEYS * 2)]
    signed = [(raw_public(key), key.sign(b"job")) for key in keys]

    def run(offset: int) -> bool:
        order = signed[offset:] + signed[:offset]
        accepts = fast.openssl_accepts
        return all(accepts(public, b"job", signature) and not accepts(public, b"jab", signature)
                   for _ in range(10) for public, signature in order)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, range(0, 16, 4)))


# --- falling back to the pure-Python verifier ---------------------------------------------------


def test_libcrypto_is_found_where_python_s_ssl_module_mapped_it():
    path = ed25519_openssl.libcrypto_path()
    if path is None and os.environ.get("CI") != "true":
        pytest.skip("no libcrypto mapped in this Python")
    assert path is not None and "libcrypto.so" in path and os.path.isfile(path)


def test_without_libcrypto_there_is_no_openssl_verifier(monkeypatch):
    monkeypatch.setattr(ed25519_openssl, "libcrypto_path", lambda: None)
    assert ed25519_openssl.load() == (None, "no libcrypto is loaded in this process")


def test_a_library_that_cannot_be_loaded_gives_no_openssl_verifier(monkeypatch, tmp_path):
    monkeypatch.setattr(ed25519_openssl, "libcrypto_path", lambda: str(tmp_path / "libcrypto.so.3"))
    fast, why = ed25519_openssl.load()
    assert fast is None and "is not usable" in why


class _FakeLibcrypto:
    """A libcrypto of another version, or with a symbol missing."""

    def __init__(self, version: int, missing: str = "") -> None:
        for name in ("EVP_PKEY_new_raw_public_key", "EVP_PKEY_free", "EVP_MD_CTX_new", "EVP_MD_CTX_free",
                     "EVP_DigestVerifyInit", "EVP_DigestVerify", "ERR_clear_error"):
            if name != missing:
                setattr(self, name, lambda *args: 0)
        self.OpenSSL_version_num = lambda: version


@pytest.mark.parametrize("lib, reason", [
    (_FakeLibcrypto(0x10100000), "older than 1.1.1"),
    (_FakeLibcrypto(0x30000000, missing="EVP_DigestVerify"), "EVP_DigestVerify"),
])
def test_an_old_or_incomplete_libcrypto_gives_no_openssl_verifier(monkeypatch, lib, reason):
    import ctypes

    monkeypatch.setattr(ctypes, "CDLL", lambda path: lib)
    fast, why = ed25519_openssl.load()
    assert fast is None and reason in why


# An agent whose libcrypto was upgraded on disk while it ran: /proc/self/maps says "(deleted)".
_UPGRADED = """
import os, shutil, ssl, sys
from agent import ed25519_openssl
lib_dir, how = sys.argv[1], sys.argv[2]
path = os.path.join(lib_dir, "libcrypto.so.3")
os.remove(path)  # the package manager's upgrade: the old file is gone...
if how == "replaced":  # ...and a new one is in its place
    shutil.copy(sys.argv[3], path)
if how == "no map_files":  # as for a user without CAP_SYS_ADMIN before Linux 4.3
    ed25519_openssl._mapped_file = lambda addresses: None
fast, where = ed25519_openssl.load()
public, message, signature = (bytes.fromhex(h) for h in sys.argv[4:7])
mapped = {line.split(maxsplit=5)[5].strip() for line in open("/proc/self/maps") if "/libcrypto.so" in line}
print(fast is not None and fast.openssl_accepts(public, message, signature), where, sorted(mapped), sep="\\n")
"""


@pytest.mark.parametrize("how", ["deleted", "replaced", "no map_files"])
def test_a_libcrypto_upgraded_on_disk_while_the_agent_runs_is_still_the_one_used(tmp_path, how):
    """The mapped libcrypto was deleted (or replaced) since the agent started: the agent still loads that
    same mapped library, and maps no second one."""
    import subprocess
    import sys

    system = ed25519_openssl.libcrypto_path()
    if system is None and os.environ.get("CI") != "true":
        pytest.skip("no libcrypto mapped in this Python")
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    import ssl  # noqa: F401 - maps libssl

    maps = Path("/proc/self/maps").read_text().splitlines()
    ssl_lib = next(line.split(maxsplit=5)[5] for line in maps if "/libssl.so" in line)
    for source in (system, ssl_lib):
        (lib_dir / os.path.basename(source)).write_bytes(Path(source).read_bytes())
    if os.path.basename(system) != "libcrypto.so.3":
        pytest.skip(f"the test copies libcrypto.so.3, this Python maps {system}")
    _, public, message, signature = TEST_2
    done = subprocess.run([sys.executable, "-c", _UPGRADED, str(lib_dir), how, system, public, message, signature],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LD_LIBRARY_PATH": str(lib_dir)}, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr
    accepted, where, mapped = done.stdout.splitlines()
    assert accepted == "True", done.stdout
    assert mapped == repr([f"{lib_dir / 'libcrypto.so.3'} (deleted)"]), done.stdout  # nothing new mapped
    deleted = f"{lib_dir / 'libcrypto.so.3'} (deleted)"
    assert where == "libcrypto.so.3" if how == "no map_files" else (
        where.startswith("/proc/self/map_files/") and where.endswith(f": {deleted}"))  # logged: what it is
