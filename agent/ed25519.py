"""Ed25519 signature verification (RFC 8032, section 5.1.7), in pure Python.

The agent checks that every job it runs was signed by the ota-bridge service; it runs on small
boards with only the standard library, so it cannot lean on a C library. Verification handles
public data only (keys, messages, signatures), so nothing here needs to run in constant time.

Points live in extended twisted-Edwards coordinates (X, Y, Z, T) with x = X/Z, y = Y/Z and
x*y = T/Z (RFC 8032, section 5.1.4): additions and doublings need no field inversion. The base
point and each public key are fixed, so their multiples are computed once into tables
(_FixedBase): a verification then costs about 130 point additions and no doublings, well under a
millisecond on a desktop CPU (a few milliseconds once per key, to build its table).
"""

from __future__ import annotations

import hashlib

# The field, the curve -x^2 + y^2 = 1 + d*x^2*y^2, and the order of its prime subgroup (5.1).
# d, sqrt(-1) and the base point B are written out (RFC 8032 gives d and B so): their modular
# powers took ~5 million instructions of every agent start (bench/profile_notes.md,
# agent-exec-until-online). tests/test_agent_ed25519.py computes them again.
P = 2**255 - 19
D = 37095705934669439343138083508754565189542113879843219016388785533085940283555  # -121665/121666 mod p
L = 2**252 + 27742317777372353535851937790883648493
_TWO_D = (2 * D) % P
_SQRT_MINUS_ONE = 19681161376707505956807079304988542015446066515923890162744021073123829784752  # 2^((p-1)/4)

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

Point = tuple[int, int, int, int]
_IDENTITY: Point = (0, 1, 1, 0)


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `message` by `public_key`.

    Follows RFC 8032, section 5.1.7: a signature is R (an encoded point) then S (a 32-byte
    little-endian integer). S >= L, an encoding of a non-point, or a y coordinate >= p (a
    non-canonical encoding) fail. The check is the cofactored one the RFC states,
    [8][S]B = [8]R + [8][k]A. Any bad input (wrong types or lengths included) gives False.
    """
    if not all(isinstance(v, (bytes, bytearray, memoryview)) for v in (public_key, message, signature)):
        return False
    public_key, message, signature = bytes(public_key), bytes(message), bytes(signature)
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= L:
        return False
    minus_a, r = _minus_key(public_key), decode_point(signature[:32])
    if minus_a is None or r is None:
        return False
    k = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little") % L
    # [S]B - [k]A - R must be a point of small order: multiplied by 8 it is the identity.
    difference = _add(_add(_base().times(s), minus_a.times(k)), _negate(r))
    for _ in range(3):
        difference = _double(difference)
    return _is_identity(difference)


def decode_point(encoded: bytes) -> Point | None:
    """The point a 32-byte encoding names (RFC 8032, section 5.1.3); None when it names none.

    The encoding is y (255 bits, little-endian) with the low bit of x in the top bit. From the
    curve equation x^2 = u/v with u = y^2 - 1 and v = d*y^2 + 1; the candidate root is
    x = u*v^3 * (u*v^7)^((p-5)/8). If v*x^2 = u it is a root; if v*x^2 = -u, x*sqrt(-1) is;
    otherwise u/v is not a square and there is no such point.
    """
    if len(encoded) != 32:
        return None
    number = int.from_bytes(encoded, "little")
    x_low_bit, y = number >> 255, number & ((1 << 255) - 1)
    if y >= P:
        return None
    x = _recover_x(y)
    if x is None or (x == 0 and x_low_bit == 1):
        return None
    if x & 1 != x_low_bit:
        x = P - x
    return (x, y, 1, (x * y) % P)


def encode_point(point: Point) -> bytes:
    """The 32-byte encoding of a point (RFC 8032, section 5.1.2)."""
    x, y, z, _ = point
    z_inverse = pow(z, P - 2, P)
    x, y = (x * z_inverse) % P, (y * z_inverse) % P
    return ((x & 1) << 255 | y).to_bytes(32, "little")


def _recover_x(y: int) -> int | None:
    u = (y * y - 1) % P
    v = (D * y * y + 1) % P
    x = (u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P)) % P
    check = (v * x * x) % P
    if check == u:
        return x
    if check == (-u) % P:
        return (x * _SQRT_MINUS_ONE) % P
    return None


# B: y = 4/5 and x positive (even), RFC 8032, section 5.1; T = x*y.
_BASE_X = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_BASE_Y = 46316835694926478169428394003475163141307993866256225615783033603165251855960
BASE: Point = (_BASE_X, _BASE_Y, 1, (_BASE_X * _BASE_Y) % P)


# --- point arithmetic in extended coordinates (RFC 8032, section 5.1.4) -----------------------


def _add(p1: Point, p2: Point) -> Point:
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = t1 * _TWO_D * t2 % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _double(p1: Point) -> Point:
    x1, y1, z1, _ = p1
    a = x1 * x1 % P
    b = y1 * y1 % P
    c = 2 * z1 * z1 % P
    h = a + b
    e = h - (x1 + y1) * (x1 + y1)
    g = a - b
    f = c + g
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _negate(p1: Point) -> Point:
    x1, y1, z1, t1 = p1
    return ((-x1) % P, y1, z1, (-t1) % P)


class _FixedBase:
    """The multiples of one fixed point, for [n]point with n < 2^256 in additions only.

    Row i holds [j * 16^i]point for j = 0..15, so [n]point is the sum of one entry per row, the
    one its i-th hexadecimal digit picks: at most 64 additions, where a plain double-and-add
    needs 255 doublings and about 128 additions.
    """

    ROWS = 64  # 256 bits, 4 a row

    def __init__(self, point: Point) -> None:
        self.rows: list[list[Point]] = []
        for _ in range(self.ROWS):
            row = [_IDENTITY, point]
            for _ in range(14):
                row.append(_add(row[-1], point))
            self.rows.append(row)
            point = _add(row[15], point)  # [16]point: the next row's unit

    def times(self, n: int) -> Point:
        result = _IDENTITY
        for row in self.rows:
            if n & 15:
                result = _add(result, row[n & 15])
            n >>= 4
        return result


_BASE_TABLE: list[_FixedBase] = []  # built on the first verification
_KEY_TABLES: dict[bytes, _FixedBase] = {}  # -A for the last MAX_KEY_TABLES public keys built
MAX_KEY_TABLES = 8  # about 300 KiB each; an agent trusting more keys rebuilds tables (slower, still correct)


def _base() -> _FixedBase:
    if not _BASE_TABLE:
        _BASE_TABLE.append(_FixedBase(BASE))
    return _BASE_TABLE[0]


def _minus_key(public_key: bytes) -> _FixedBase | None:
    """The table of -A for a public key; None when the key is not a point (nothing is kept)."""
    table = _KEY_TABLES.get(public_key)
    if table is None:
        a = decode_point(public_key)
        if a is None:
            return None
        if len(_KEY_TABLES) >= MAX_KEY_TABLES:
            del _KEY_TABLES[next(iter(_KEY_TABLES))]
        table = _KEY_TABLES[public_key] = _FixedBase(_negate(a))
    return table


def _is_identity(p1: Point) -> bool:
    x1, y1, z1, _ = p1
    return x1 % P == 0 and (y1 - z1) % P == 0
