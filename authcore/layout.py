"""numpy dtypes of the kernel's state rows (mirrors of _kernel.pxd structs).

The kernel asserts at import that each C struct has exactly the size and
field offsets of its dtype here, so a drift between the two is a crash at
start, never silent corruption.  Snapshots store arrays of these dtypes.
"""

from __future__ import annotations

import numpy as np

ACCOUNT_DTYPE = np.dtype(
    [
        ("id", "<u8"),
        ("balance", "<i8"),
        ("credit_limit", "<i8"),
        ("held", "<i8"),
        ("single_limit", "<i8"),
        ("daily_limit", "<i8"),
        ("spent_today", "<i8"),
        ("spent_day", "<i8"),
        ("opened_at", "<i8"),
        ("spend_count", "<i8"),
        ("spend_total_lo", "<u8"),
        ("spend_total_hi", "<i8"),
        ("travel_stamp", "<i8"),
        ("activity", "<u4"),
        ("currency", "<u2"),
        ("travel_country", "<u2"),
        ("status", "u1"),
        ("kind", "u1"),
        ("_pad", "V14"),
    ]
)
account_row_size = 128  # issue 2: at most 128 bytes per account row

HOLD_DTYPE = np.dtype(
    [
        ("id", "<u8"),
        ("merchant", "<u8"),
        ("remaining", "<i8"),
        ("captured", "<i8"),
        ("refunded", "<i8"),
        ("expires", "<i8"),
        ("account", "<u4"),
        ("credited", "<i4"),
        ("state", "u1"),
        ("_pad", "V7"),
    ]
)
hold_row_size = 64

REMEMBERED_DTYPE = np.dtype(
    [
        ("id", "<u8"),
        ("stamp", "<i8"),
        ("available", "<i8"),
        ("approved_amount", "<i8"),
        ("status", "u1"),
        ("review", "u1"),
        ("has_available", "u1"),
        ("op", "u1"),
        ("_pad", "V4"),
    ]
)
remembered_row_size = 40  # + 16 bytes of index per id at load <= 1/2: <= 64 (issue 2)

CARD_DTYPE = np.dtype([("key", "<u8"), ("rest", "V24"), ("account", "<u8")])
card_row_size = 40

assert ACCOUNT_DTYPE.itemsize == account_row_size
assert HOLD_DTYPE.itemsize == hold_row_size
assert REMEMBERED_DTYPE.itemsize == remembered_row_size
assert CARD_DTYPE.itemsize == card_row_size
assert remembered_row_size + 2 * 8 <= 64
