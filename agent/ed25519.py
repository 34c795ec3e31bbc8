"""Ed25519 signature verification (RFC 8032, section 5.1.7), in pure Python.

The agent checks that every job it runs was signed by the ota-bridge service; it runs on small
boards with only the standard library, so it cannot count on a C library (it uses the system's
OpenSSL when there is one: agent/ed25519_openssl.py, which gives this module's answers). Verification handles
public data only (keys, messages, signatures), so nothing here needs to run in constant time.

Points live in extended twisted-Edwards coordinates (X, Y, Z, T) with x = X/Z, y = Y/Z and
x*y = T/Z (RFC 8032, section 5.1.4): additions and doublings need no field inversion. The base
point and each public key are fixed, so their multiples are computed once into tables
(_FixedBase), stored in the affine "Niels" form (y+x, y-x, 2*d*x*y) that adds in 7 field
multiplications: a verification then costs about 100 such additions (one per signed radix-32
digit of each scalar, into one sum) and no doublings but the final three, about 0.4 ms on a
desktop CPU (a few milliseconds once per key, and once for the base point, to build its table).
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
    difference = _add(minus_a.times(k, _base().times(s)), _negate(r))
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


# A point in affine Niels form, (y+x, y-x, 2*d*x*y) with Z = 1: what a table holds.
Niels = tuple[int, int, int]


def _add_niels(p1: Point, q: Niels, negative: bool) -> Point:
    """p1 + q (p1 - q when `negative`): the addition of RFC 8032, 5.1.4, with q's Z = 1 and its
    sums and product precomputed; -q swaps y+x and y-x and negates 2dxy."""
    x1, y1, z1, t1 = p1
    ypx, ymx, t2d = q
    if negative:
        ypx, ymx, t2d = ymx, ypx, -t2d
    a = (y1 - x1) * ymx % P
    b = (y1 + x1) * ypx % P
    c = t1 * t2d % P
    d = 2 * z1
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


class _FixedBase:
    """The multiples of one fixed point, for [n]point with 0 <= n < 2^260 in additions only.

    n is written in signed radix-32 digits, each in [-16, 16): n = sum of d_i * 32^i. Row i holds
    [j * 32^i]point for j = 1..16 in Niels form, so [n]point is one addition (or subtraction) per
    nonzero digit, at most 52 (51 for a scalar below L), where a plain double-and-add needs 255
    doublings and about 128 additions. 832 entries, about 270 KiB (radix 64 would save 8
    additions a scalar for 150 KiB more).
    """

    BITS = 5
    ROWS = 52  # 260 bits: room for the carry of a 256-bit scalar's top digit

    def __init__(self, point: Point) -> None:
        half = 1 << (self.BITS - 1)
        extended: list[Point] = []
        for _ in range(self.ROWS):
            multiple = point
            extended.append(multiple)
            for _ in range(half - 1):
                multiple = _add(multiple, point)
                extended.append(multiple)
            point = _double(multiple)  # [32]point: the next row's unit
        niels = _to_niels(extended)
        self.rows = [niels[i:i + half] for i in range(0, len(niels), half)]

    def times(self, n: int, start: Point = (0, 1, 1, 0)) -> Point:
        """start + [n]point."""
        result, carry, half, mask = start, 0, 1 << (self.BITS - 1), (1 << self.BITS) - 1
        for row in self.rows:
            digit = (n & mask) + carry
            n >>= self.BITS
            carry = digit >= half
            if carry:
                digit -= 1 << self.BITS
            if digit:
                result = _add_niels(result, row[abs(digit) - 1], digit < 0)
        if n or carry:
            raise ValueError("the scalar is too large for the table")
        return result


def _to_niels(points: list[Point]) -> list[Niels]:
    """The points in Niels form, with one field inversion for all (Montgomery's trick)."""
    prefix, running = [], 1
    for _, _, z, _ in points:
        prefix.append(running)
        running = running * z % P
    inverse = pow(running, P - 2, P)
    out: list[Niels] = [(0, 0, 0)] * len(points)
    for i in range(len(points) - 1, -1, -1):
        x, y, z, _ = points[i]
        z_inverse = inverse * prefix[i] % P
        inverse = inverse * z % P
        x, y = x * z_inverse % P, y * z_inverse % P
        out[i] = ((y + x) % P, (y - x) % P, x * y % P * _TWO_D % P)
    return out


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
