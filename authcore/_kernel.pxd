# The kernel's state layout and C signatures.  Every row type is a packed
# C struct whose size and field offsets are pinned against the numpy dtypes
# in authcore/layout.py at import time (see Kernel.__cinit__): the numpy
# arrays own the memory, the kernel reads and writes it through these
# structs inside nogil loops.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef packed struct Request:          # 64 bytes: wire, batch API and log unit
    uint64_t id
    uint64_t account                  # or the hold id (increment/capture/void/refund)
    uint64_t to                       # transfer receiver, or merchant
    int64_t amount                    # or credit_limit (open, set_limits)
    int64_t single_limit
    int64_t daily_limit
    uint16_t currency
    uint16_t mcc
    uint16_t country
    uint8_t op
    uint8_t channel
    uint8_t kind
    uint8_t flags
    uint8_t _pad[6]

cdef packed struct Answer:           # 64 bytes
    uint64_t id
    int64_t stamp
    int64_t available
    int64_t approved_amount
    int64_t balance
    int64_t credit_limit
    int64_t held
    uint8_t status
    uint8_t review
    uint8_t account_status
    uint8_t op
    uint8_t has_available
    uint8_t _pad[3]

cdef packed struct Account:          # 128 bytes
    uint64_t id
    int64_t balance
    int64_t credit_limit
    int64_t held
    int64_t single_limit
    int64_t daily_limit
    int64_t spent_today               # approved spend on day spent_day (saturating)
    int64_t spent_day                 # UTC day number of spent_today
    int64_t opened_at
    int64_t spend_count               # lifetime approved spends (amount_spike)
    uint64_t spend_total_lo           # lifetime approved spend total, 128-bit
    int64_t spend_total_hi
    int64_t travel_stamp              # last approved qr/card_present auth (0 = none)
    uint32_t activity                 # fraud ring slot + 1 (0 = none)
    uint16_t currency
    uint16_t travel_country
    uint8_t status
    uint8_t kind
    uint8_t _pad[14]

cdef packed struct Hold:             # 64 bytes
    uint64_t id
    uint64_t merchant
    int64_t remaining
    int64_t captured
    int64_t refunded
    int64_t expires
    uint32_t account                  # account row
    int32_t credited                  # account row credited at capture, -1 = settlement
    uint8_t state
    uint8_t _pad[7]

cdef packed struct Remembered:       # 40 bytes: one idempotency entry
    uint64_t id
    int64_t stamp
    int64_t available
    int64_t approved_amount
    uint8_t status
    uint8_t review
    uint8_t has_available
    uint8_t op
    uint8_t _pad[4]

cdef packed struct Card:             # 40 bytes
    uint64_t key                      # first 8 bytes of the PAN's HMAC
    uint8_t rest[24]                  # the other 24 bytes
    uint64_t account                  # account id

ctypedef struct Index:               # open addressing, linear probing
    uint64_t* slots                   # 0 = empty, else value (row + 1 or seq + 1)
    uint64_t mask
    uint64_t count
    char* rows                        # the keyed rows (key = first uint64 of a row)
    uint64_t stride
    uint64_t rowmask                  # (value - 1) & rowmask = row

ctypedef struct Rules:               # §5 settings in microseconds and points
    int enabled
    int64_t decline_score
    int64_t review_score
    int64_t velocity_window
    int64_t velocity_attempts
    int64_t velocity_points
    int64_t card_window
    int64_t card_attempts
    int64_t card_max_amount
    int64_t card_points
    int64_t spike_min_approved
    int64_t spike_min_amount
    int64_t spike_factor
    int64_t spike_points
    int64_t travel_window
    int64_t travel_points
    int64_t new_age
    int64_t new_min_amount
    int64_t new_points
    int64_t mcc_points
    int64_t burst_window
    int64_t burst_last
    int64_t burst_declines
    int64_t burst_points
    int64_t hold_ttl
    int64_t activity_window           # max(velocity_window, card_window)

ctypedef struct State:
    Account* accounts
    uint64_t account_count
    Index account_index
    Hold* holds                       # ring: hold seq s lives at row s & hold_rowmask
    uint64_t hold_rowmask
    uint64_t hold_head                # oldest retained seq
    uint64_t hold_tail                # next seq
    uint64_t hold_expire              # next seq to check for expiry
    Index hold_index
    Remembered* remembered            # ring, like holds
    uint64_t remembered_rowmask
    uint64_t remembered_head
    uint64_t remembered_tail
    Index remembered_index
    int64_t* merchants                # rows [id, pos, ring of burst_last signed stamps (<0 = declined)]
    uint64_t merchant_width           # int64 words per merchant row
    uint64_t merchant_count
    uint64_t merchant_hand            # clock hand for reusing stale merchant rows
    Index merchant_index
    Card* cards
    uint64_t card_count
    Index card_index
    int64_t* act                      # rows [owner row+1, last, vpos, cpos, velocity ring, card ring]
    uint64_t act_width
    uint64_t act_high                 # rows ever used
    uint64_t act_hand                 # clock hand for reusing stale rows
    int64_t* settlement               # by currency code
    uint8_t* risky_mcc                # [mcc_max + 1]
    Rules rules


# authcore.records.auth_code in C (SPEC §10.11): 6 base-36 digits of
# splitmix64(id), least significant first.  Shared by the protocol codecs;
# tests check it against the Python reference.
cdef enum:
    AUTH_CODE_CHARS = 6


cdef inline void put_auth_code(uint8_t* out, uint64_t x) noexcept nogil:
    cdef const char* base36 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    cdef uint64_t z = x + 0x9E3779B97F4A7C15ULL
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    z = z ^ (z >> 31)
    cdef int i
    for i in range(AUTH_CODE_CHARS):
        out[i] = base36[z % 36]
        z //= 36
