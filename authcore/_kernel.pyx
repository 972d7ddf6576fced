# cython: language_level=3
"""The authorisation kernel: decides whole batches in one nogil loop.

Goals: SPEC §1-§6 and §10 exactly (docs/semantics.md), one writer, no locks,
no allocation and no Python inside the loop, deterministic (the only time is
the stamp passed in).  Every table that may grow is grown *before* the loop
by ``reserve(n)``, which is why the loop can never fail: each request gets
a status in its answer row, as TigerBeetle's commit fills a results slice.

Non-goals: durability (authcore.storage logs the batch before it reaches
us), parsing (authcore.records), clocks (authcore.engine).

State lives in numpy arrays owned by ``Kernel``; the loop reads and writes
them through the packed structs of _kernel.pxd, whose layout is pinned
against authcore.layout at import.
"""

cimport cython
from libc.stdint cimport INT64_MIN, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcmp, memcpy, memset

cimport numpy as cnp
import mmap
import threading

import numpy as np

from . import constants as C
from .layout import ACCOUNT_DTYPE, CARD_DTYPE, HOLD_DTYPE, REMEMBERED_DTYPE

cnp.import_array()

cdef extern from "<sys/mman.h>":
    int madvise(void* addr, size_t length, int advice) nogil

cdef extern from *:
    """
    #include <stdint.h>
    /* amount_spike: amount * count > factor * total, exactly (128-bit). */
    static inline int ac_spike(int64_t amount, int64_t count, uint64_t lo, int64_t hi, int64_t factor) {
        __int128 total = (__int128)(((unsigned __int128)(uint64_t)hi << 64) | (unsigned __int128)lo);
        return (__int128)amount * (__int128)count > (__int128)factor * total;
    }
    static inline void ac_add128(uint64_t *lo, int64_t *hi, int64_t v) {
        unsigned __int128 t = ((unsigned __int128)(uint64_t)*hi << 64) | (unsigned __int128)*lo;
        t += (unsigned __int128)(__int128)v;
        *lo = (uint64_t)t;
        *hi = (int64_t)(uint64_t)(t >> 64);
    }
    /* GCC 12 silently dropped __builtin_prefetch in this file (every -O level
       above 0), so the hint is a volatile asm it cannot remove. */
    #if defined(__x86_64__) || defined(__i386__)
    #define ac_prefetch(p) __asm__ volatile("prefetcht0 %0" : : "m"(*(const char *)(p)))
    #else
    #define ac_prefetch(p) __builtin_prefetch((const void *)(p), 0, 3)
    #endif
    /* Write every page of [p, p+n) with the byte it holds: faults the page
       in (a huge page where the range allows) and keeps the contents.
       Volatile so the compiler cannot drop a store of the loaded value. */
    static void ac_touch(char *p, size_t n, size_t step) {
        volatile char *q = (volatile char *)p;
        for (size_t i = 0; i < n; i += step) q[i] = q[i];
    }
    #ifndef AUTHCORE_VERIFY
    #define AUTHCORE_VERIFY 0
    #endif
    """
    int ac_spike(int64_t amount, int64_t count, uint64_t lo, int64_t hi, int64_t factor) noexcept nogil
    void ac_add128(uint64_t* lo, int64_t* hi, int64_t v) noexcept nogil
    int AUTHCORE_VERIFY
    void ac_prefetch(const void* p) noexcept nogil
    void ac_touch(char* p, size_t n, size_t step) noexcept nogil

# Mirrors of authcore.constants (checked equal at import below).
cdef enum:
    OP_OPEN = 1
    OP_DEPOSIT = 2
    OP_WITHDRAW = 3
    OP_AUTHORIZE = 4
    OP_INCREMENT = 5
    OP_CAPTURE = 6
    OP_VOID = 7
    OP_REFUND = 8
    OP_PURCHASE = 9
    OP_TRANSFER = 10
    OP_SET_LIMITS = 11
    OP_FREEZE = 12
    OP_UNFREEZE = 13
    OP_CLOSE = 14
    OP_ISSUE_CARD = 15
    OP_QUERY = 16

cdef enum:
    ST_APPROVED = 0
    ST_PARTIAL = 1
    ST_INVALID_AMOUNT = 2
    ST_INVALID_REQUEST = 3
    ST_CURRENCY_MISMATCH = 4
    ST_INSUFFICIENT_FUNDS = 5
    ST_NO_AUTH = 6
    ST_AMOUNT_EXCEEDS_HOLD = 7
    ST_NOT_CAPTURED = 8
    ST_ACCOUNT_EXISTS = 9
    ST_UNAVAILABLE = 10
    ST_NO_ACCOUNT = 11
    ST_INVALID_CARD = 12
    ST_ACCOUNT_INACTIVE = 13
    ST_NOT_PERMITTED = 14
    ST_LIMIT_EXCEEDED = 15
    ST_SUSPECTED_FRAUD = 16
    ST_AUTH_CLOSED = 17
    ST_AMOUNT_EXCEEDS_CAPTURE = 18
    ST_BAD_REQUEST = 19
    ST_ACCOUNT_NOT_EMPTY = 20

cdef enum:
    CH_ONLINE = 0
    CH_QR = 1
    CH_CARD_PRESENT = 2
    CH_P2P = 3
    KIND_WALLET = 0
    KIND_MERCHANT = 1
    AS_ACTIVE = 0
    AS_FROZEN = 1
    AS_CLOSED = 2
    HS_OPEN = 1
    HS_CAPTURED = 2
    HS_VOIDED = 3
    HS_EXPIRED = 4
    FLAG_ALLOW_PARTIAL = 1
    FLAG_SET_CREDIT = 2
    FLAG_SET_SINGLE = 4
    FLAG_SET_DAILY = 8
    FLAG_NO_CARD = 16
    FLAG_OR_PURCHASE = 32

cdef int64_t AMOUNT_MAX = C.amount_max
cdef int64_t BOUND = C.balance_bound
cdef int64_t LIMIT_MAX = C.limit_max
cdef int64_t US_PER_DAY = C.us_per_day
cdef int64_t US_PER_S = C.us_per_s
cdef uint64_t CURRENCY_MAX = C.currency_max
cdef uint16_t MCC_MAX = C.mcc_max
cdef uint64_t PROBE_MAX = C.activity_probe_max
cdef uint64_t ROWS_INITIAL = C.table_rows_initial
cdef size_t PAGE_BYTES = 4096      # smallest page: prefault touches one byte in each
cdef size_t POPULATE_CHUNK_BYTES = 64 << 20  # populate() steps, so a reader close behind shares the work
cdef int MADV_POPULATE_WRITE = 23  # <linux/mman.h>; older libcs lack the name
cdef size_t PREFAULT_ROWS_AHEAD = 1 << 20  # unused rows of a row table that prefault touches
HUGE_PAGE_BYTES = 2 << 20          # x86-64 transparent huge page
CACHE_LINE_BYTES = 64
# An activity row is one header word, the velocity ring, then the card ring,
# padded to whole cache lines: with the defaults (10 + 5 stamps) exactly two
# aligned lines.  The header packs the owner (account row + 1, 32 bits) and
# the two ring positions (16 bits each).  A row's newest attempt is the
# velocity ring's newest stamp: every attempt enters that ring.
cdef enum:
    ACT_HEADER = 1
    ACT_ROW_ALIGN_WORDS = 8
    M_ID = 0
    M_POS = 1
    M_HEADER = 2


# --- hashing and the open-addressing index --------------------------------

cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    """splitmix64's finaliser: client ids are often sequential."""
    x ^= x >> 30
    x *= <uint64_t>0xbf58476d1ce4e5b9ULL
    x ^= x >> 27
    x *= <uint64_t>0x94d049bb133111ebULL
    x ^= x >> 31
    return x


# Keys that differ only in their low IX_GROUP_BITS share a home cache line
# (8 slots of 8 bytes): a gateway's sequential request ids then cost one
# random miss per 8 requests in the id memory and the hold index, instead
# of one each, and those memories evict in the same order.  The groups
# themselves are spread by mix64, so random ids hash as well as before.
cdef enum:
    IX_GROUP_BITS = 3
cdef uint64_t IX_GROUP_LOW = (1ULL << IX_GROUP_BITS) - 1


cdef inline uint64_t ix_hash(uint64_t key) noexcept nogil:
    return (mix64(key >> IX_GROUP_BITS) << IX_GROUP_BITS) | (key & IX_GROUP_LOW)


# A slot is 0 (empty) or tag << 40 | value: the value is row + 1 (or a ring
# sequence folded by ring_value), the tag the low 24 bits of the key's hash.
# A probe compares tags first and reads a row's key only when they agree,
# so looking up an absent id (every new request id) almost never touches a
# row: without tags, each occupied slot on its probe path was one more
# random cache miss.  The tag holds the low bits of the entry's home slot,
# and entries sit a short way past their home, so the home is recovered
# from the slot position and the tag alone (slot_home): deleting never
# reads a row either, which matters because full memories evict one entry
# for every new one.
cdef enum:
    IX_VALUE_BITS = 40
    IX_TAG_BITS = 24
cdef uint64_t IX_VALUE_MASK = (1ULL << IX_VALUE_BITS) - 1
cdef uint64_t IX_TAG_LOW = (1ULL << IX_TAG_BITS) - 1
cdef uint64_t IX_SEQ_MASK = (1ULL << (IX_VALUE_BITS - 1)) - 1


cdef inline uint64_t ix_tag(uint64_t hsh) noexcept nogil:
    return (hsh & IX_TAG_LOW) << IX_VALUE_BITS


cdef inline uint64_t slot_home(Index* ix, uint64_t pos, uint64_t s) noexcept nogil:
    """The home of the entry in slot ``pos``: home and tag agree modulo
    2^24 (or the table size if smaller), and pos - home is far smaller."""
    cdef uint64_t low = min(ix.mask, IX_TAG_LOW)
    return (pos - ((pos - (s >> IX_VALUE_BITS)) & low)) & ix.mask


cdef inline uint64_t ring_value(uint64_t seq) noexcept nogil:
    """The index value of ring sequence ``seq``: (value - 1) & rowmask is
    its row for any ring of at most 2^39 rows, and it fits in 40 bits."""
    return (seq & IX_SEQ_MASK) + 1


cdef inline uint64_t ix_key(Index* ix, uint64_t v) noexcept nogil:
    return (<uint64_t*>(ix.rows + ((v - 1) & ix.rowmask) * ix.stride))[0]


cdef inline uint64_t ix_find(Index* ix, uint64_t key) noexcept nogil:
    cdef uint64_t hsh = ix_hash(key)
    cdef uint64_t h = hsh & ix.mask
    cdef uint64_t tag = ix_tag(hsh)
    cdef uint64_t s
    while True:
        s = ix.slots[h]
        if s == 0:
            return 0
        if (s & ~IX_VALUE_MASK) == tag and ix_key(ix, s & IX_VALUE_MASK) == key:
            return s & IX_VALUE_MASK
        h = (h + 1) & ix.mask


cdef inline void ix_insert(Index* ix, uint64_t key, uint64_t value) noexcept nogil:
    cdef uint64_t hsh = ix_hash(key)
    cdef uint64_t h = hsh & ix.mask
    while ix.slots[h] != 0:
        h = (h + 1) & ix.mask
    ix.slots[h] = ix_tag(hsh) | value
    ix.count += 1


cdef void ix_delete(Index* ix, uint64_t key, uint64_t value) noexcept nogil:
    """Backward-shift deletion: keeps every probe chain unbroken."""
    cdef uint64_t i = ix_hash(key) & ix.mask
    cdef uint64_t j, k, s
    while (ix.slots[i] & IX_VALUE_MASK) != value:
        if ix.slots[i] == 0:
            return
        i = (i + 1) & ix.mask
    j = i
    while True:
        j = (j + 1) & ix.mask
        s = ix.slots[j]
        if s == 0:
            break
        k = slot_home(ix, j, s)
        # Leave s where it is if its home k lies cyclically in (i, j].
        if i <= j:
            if i < k and k <= j:
                continue
        else:
            if i < k or k <= j:
                continue
        ix.slots[i] = s
        i = j
    ix.slots[i] = 0
    ix.count -= 1


# --- small helpers ------------------------------------------------------------

cdef inline bint amount_ok(int64_t amount) noexcept nogil:
    return 0 < amount <= AMOUNT_MAX


cdef inline bint limit_ok(int64_t x) noexcept nogil:
    return 0 <= x <= LIMIT_MAX


cdef inline bint in_bound(int64_t x) noexcept nogil:
    return -BOUND <= x <= BOUND


cdef inline int64_t available(Account* a) noexcept nogil:
    return a.balance + a.credit_limit - a.held


cdef inline int64_t spent_on(Account* a, int64_t now) noexcept nogil:
    if a.spent_day == now // US_PER_DAY:
        return a.spent_today
    return 0


cdef inline void add_spent(Account* a, int64_t now, int64_t amount) noexcept nogil:
    cdef int64_t day = now // US_PER_DAY
    if a.spent_day != day:
        a.spent_day = day
        a.spent_today = 0
    a.spent_today += amount
    if a.spent_today > BOUND:  # saturate: only compared with limits <= 10^15
        a.spent_today = BOUND


cdef inline bint names_hold(uint8_t op) noexcept nogil:
    return op == OP_CAPTURE or op == OP_VOID or op == OP_INCREMENT or op == OP_REFUND


cdef inline Account* account_of(State* S, uint64_t id, uint32_t* row) noexcept nogil:
    cdef uint64_t v = ix_find(&S.account_index, id)
    if v == 0:
        return NULL
    row[0] = <uint32_t>(v - 1)
    return &S.accounts[v - 1]


cdef inline Hold* hold_of(State* S, uint64_t id) noexcept nogil:
    cdef uint64_t v = ix_find(&S.hold_index, id)
    if v == 0:
        return NULL
    return &S.holds[(v - 1) & S.hold_rowmask]


cdef inline void set_available(Answer* ans, Account* a) noexcept nogil:
    ans.available = available(a)
    ans.has_available = 1


cdef inline int64_t* credited_balance(State* S, int32_t row, uint16_t currency) noexcept nogil:
    if row >= 0:
        return &S.accounts[row].balance
    return &S.settlement[currency]


cdef inline int32_t merchant_account_row(State* S, uint64_t merchant, uint16_t currency) noexcept nogil:
    """The account a capture credits: the merchant id's, same currency, else settlement (-1)."""
    cdef uint32_t row
    cdef Account* m = account_of(S, merchant, &row)
    if m != NULL and m.currency == currency:
        return <int32_t>row
    return -1


# --- holds and expiry ------------------------------------------------------

cdef inline void expire_until(State* S, int64_t stamp) noexcept nogil:
    """Release every open hold whose expiry is at or before ``stamp``.

    Holds are created in stamp order with one TTL, so expiries are sorted by
    sequence and a single cursor suffices.
    """
    cdef Hold* h
    while S.hold_expire < S.hold_tail:
        h = &S.holds[S.hold_expire & S.hold_rowmask]
        if h.expires > stamp:
            return
        if h.state == HS_OPEN:
            S.accounts[h.account].held -= h.remaining
            h.remaining = 0
            h.state = HS_EXPIRED
        S.hold_expire += 1


cdef inline Hold* new_hold(State* S, uint64_t id, uint32_t row, uint64_t merchant, int64_t now) noexcept nogil:
    cdef uint64_t seq = S.hold_tail
    cdef Hold* h = &S.holds[seq & S.hold_rowmask]
    memset(h, 0, sizeof(Hold))
    h.id = id
    h.merchant = merchant
    h.account = row
    h.credited = -1
    h.expires = now + S.rules.hold_ttl
    if seq > S.hold_head and h.expires < S.holds[(seq - 1) & S.hold_rowmask].expires:
        # The TTL was lowered (a CONFIG record): expiry times must stay
        # sorted for the single expiry cursor, so this hold expires with
        # the newest one before it, at most the old TTL late.
        h.expires = S.holds[(seq - 1) & S.hold_rowmask].expires
    S.hold_tail = seq + 1
    ix_insert(&S.hold_index, id, ring_value(seq))
    return h


# --- fraud (SPEC §5) ----------------------------------------------------------

cdef inline uint64_t act_owner(int64_t* r) noexcept nogil:
    return (<uint64_t>r[0]) & 0xFFFFFFFFULL


cdef inline int64_t act_vpos(int64_t* r) noexcept nogil:
    return <int64_t>((<uint64_t>r[0] >> 32) & 0xFFFFULL)


cdef inline int64_t act_cpos(int64_t* r) noexcept nogil:
    return <int64_t>(<uint64_t>r[0] >> 48)


cdef inline void act_set_header(int64_t* r, uint64_t owner, int64_t vpos, int64_t cpos) noexcept nogil:
    r[0] = <int64_t>(owner | (<uint64_t>vpos << 32) | (<uint64_t>cpos << 48))


cdef inline int64_t act_newest(State* S, int64_t* r) noexcept nogil:
    cdef int64_t n_v = S.rules.velocity_attempts
    return r[ACT_HEADER + (act_vpos(r) + n_v - 1) % n_v]


cdef inline int64_t* activity_row(State* S, Account* a, uint32_t row) noexcept nogil:
    cdef int64_t* r
    if a.activity == 0:
        return NULL
    r = S.act + (a.activity - 1) * S.act_width
    if act_owner(r) != <uint64_t>row + 1:
        return NULL  # reused by another account: ours was stale, i.e. empty
    return r


cdef int64_t* activity_claim(State* S, Account* a, uint32_t row, int64_t now) noexcept nogil:
    """This account's ring row, reusing a stale row or taking a fresh one."""
    cdef int64_t* r = activity_row(S, a, row)
    cdef uint64_t k, slot, i
    cdef bint found = False
    if r != NULL:
        return r
    for k in range(PROBE_MAX):
        if S.act_high == 0:
            break
        if S.act_hand >= S.act_high:
            S.act_hand = 0
        slot = S.act_hand
        S.act_hand += 1
        if act_newest(S, S.act + slot * S.act_width) <= now - S.rules.activity_window:
            found = True
            break
    if not found:
        slot = S.act_high  # reserve() guarantees room
        S.act_high += 1
    r = S.act + slot * S.act_width
    act_set_header(r, <uint64_t>row + 1, 0, 0)
    for i in range(ACT_HEADER, S.act_width):
        r[i] = INT64_MIN
    a.activity = <uint32_t>(slot + 1)
    return r


cdef inline int64_t* merchant_row(State* S, uint64_t merchant, bint create, int64_t now) noexcept nogil:
    """The merchant's decline ring; creating one reuses a stale row first,
    so a stream of new merchant ids cannot grow the table without bound."""
    cdef uint64_t v = ix_find(&S.merchant_index, merchant)
    cdef int64_t* r
    cdef int64_t newest
    cdef uint64_t k, slot
    if v != 0:
        return S.merchants + (v - 1) * S.merchant_width
    if not create:
        return NULL
    for k in range(PROBE_MAX):
        if S.merchant_count == 0:
            break
        if S.merchant_hand >= S.merchant_count:
            S.merchant_hand = 0
        slot = S.merchant_hand
        S.merchant_hand += 1
        r = S.merchants + slot * S.merchant_width
        newest = r[M_HEADER + (r[M_POS] + S.rules.burst_last - 1) % S.rules.burst_last]
        if newest < 0:
            newest = -newest
        if newest <= now - S.rules.burst_window:  # no attempt of it can count again
            ix_delete(&S.merchant_index, <uint64_t>r[M_ID], slot + 1)
            memset(r, 0, S.merchant_width * sizeof(int64_t))
            r[M_ID] = <int64_t>merchant
            ix_insert(&S.merchant_index, merchant, slot + 1)
            return r
    r = S.merchants + S.merchant_count * S.merchant_width
    memset(r, 0, S.merchant_width * sizeof(int64_t))
    r[M_ID] = <int64_t>merchant
    S.merchant_count += 1
    ix_insert(&S.merchant_index, merchant, S.merchant_count)
    return r


cdef inline int64_t ring_next(int64_t pos, int64_t n) noexcept nogil:
    """(pos + 1) % n for 0 <= pos < n, without the 64-bit division (two or
    three per spend)."""
    pos += 1
    return 0 if pos >= n else pos


cdef inline void record_attempt(State* S, Account* a, uint32_t row, uint64_t merchant,
                                int64_t amount, int64_t now, bint declined) noexcept nogil:
    cdef int64_t* r = activity_claim(S, a, row, now)
    cdef int64_t n_v = S.rules.velocity_attempts
    cdef int64_t n_c = S.rules.card_attempts
    cdef int64_t* m
    cdef int64_t vpos = act_vpos(r)
    cdef int64_t cpos = act_cpos(r)
    r[ACT_HEADER + vpos] = now
    vpos = ring_next(vpos, n_v)
    if amount <= S.rules.card_max_amount:
        r[ACT_HEADER + n_v + cpos] = now
        cpos = ring_next(cpos, n_c)
    act_set_header(r, act_owner(r), vpos, cpos)
    if merchant != 0:
        m = merchant_row(S, merchant, True, now)
        m[M_HEADER + m[M_POS]] = -now if declined else now
        m[M_POS] = ring_next(m[M_POS], S.rules.burst_last)


cdef int64_t fraud_score(State* S, Account* a, uint32_t row, Request* r, int64_t now,
                         uint8_t channel, uint64_t merchant) noexcept nogil:
    """The §5 score of spending ``r.amount``; transfers pass channel p2p and
    merchant 0, and their mcc is ignored."""
    cdef Rules* R = &S.rules
    cdef int64_t score = 0
    cdef int64_t* act = activity_row(S, a, row)
    cdef int64_t* m
    cdef int64_t i, declines, decline_below
    if act != NULL:
        # The ring holds the last N attempts; N of them fall in the window
        # exactly when the oldest of the N (the next to be overwritten) does.
        if act[ACT_HEADER + act_vpos(act)] > now - R.velocity_window:
            score += R.velocity_points
        if act[ACT_HEADER + R.velocity_attempts + act_cpos(act)] > now - R.card_window:
            score += R.card_points
    if (a.spend_count >= R.spike_min_approved and r.amount >= R.spike_min_amount
            and ac_spike(r.amount, a.spend_count, a.spend_total_lo, a.spend_total_hi, R.spike_factor)):
        score += R.spike_points
    if ((channel == CH_QR or channel == CH_CARD_PRESENT) and a.travel_stamp != 0
            and a.travel_country != r.country and now - a.travel_stamp < R.travel_window):
        score += R.travel_points
    if now - a.opened_at < R.new_age and r.amount >= R.new_min_amount:
        score += R.new_points
    if r.op != OP_TRANSFER and r.mcc <= MCC_MAX and S.risky_mcc[r.mcc]:
        score += R.mcc_points
    if merchant != 0:
        m = merchant_row(S, merchant, False, now)
        if m != NULL:
            # A decline stamped s is stored as -s: it counts when -s > now -
            # window, i.e. stored < window - now (and < 0).  One compare per
            # entry and no branch, so the compiler may vectorise the count.
            declines = 0
            decline_below = min(<int64_t>0, R.burst_window - now)
            for i in range(R.burst_last):
                declines += m[M_HEADER + i] < decline_below
            if declines >= R.burst_declines:
                score += R.burst_points
    return score


# --- operations -----------------------------------------------------------------
# Each returns the status; checks are written one per line in SPEC order.

cdef uint8_t op_open(State* S, Request* r, Answer* ans, int64_t now) noexcept nogil:
    cdef uint32_t row
    cdef Account* a
    if r.id == 0 or r.account == 0:
        return ST_INVALID_REQUEST
    if r.currency == 0 or r.currency > CURRENCY_MAX:
        return ST_INVALID_REQUEST
    if r.kind > KIND_MERCHANT:
        return ST_INVALID_REQUEST
    if not limit_ok(r.amount) or not limit_ok(r.single_limit) or not limit_ok(r.daily_limit):
        return ST_INVALID_AMOUNT
    a = account_of(S, r.account, &row)
    if a != NULL:
        set_available(ans, a)
        return ST_ACCOUNT_EXISTS
    row = <uint32_t>S.account_count
    a = &S.accounts[row]
    memset(a, 0, sizeof(Account))
    a.id = r.account
    a.currency = r.currency
    a.kind = r.kind
    a.status = AS_ACTIVE
    a.credit_limit = r.amount
    a.single_limit = r.single_limit
    a.daily_limit = r.daily_limit
    a.opened_at = now
    a.spent_day = -1
    S.account_count += 1
    ix_insert(&S.account_index, r.account, row + 1)
    set_available(ans, a)
    return ST_APPROVED


cdef uint8_t op_deposit_withdraw(State* S, Request* r, Answer* ans, bint deposit) noexcept nogil:
    cdef uint32_t row
    cdef Account* a
    cdef int64_t* settle
    if r.id == 0 or r.account == 0:
        return ST_INVALID_REQUEST
    if not amount_ok(r.amount):
        return ST_INVALID_AMOUNT
    a = account_of(S, r.account, &row)
    if a == NULL:
        return ST_NO_ACCOUNT
    set_available(ans, a)
    if r.currency != 0 and r.currency != a.currency:
        return ST_CURRENCY_MISMATCH
    if a.status != AS_ACTIVE:
        return ST_ACCOUNT_INACTIVE
    settle = &S.settlement[a.currency]
    if deposit:
        if not in_bound(a.balance + r.amount) or not in_bound(settle[0] - r.amount):
            return ST_INVALID_AMOUNT
        a.balance += r.amount
        settle[0] -= r.amount
    else:
        if a.balance - a.held < r.amount:
            return ST_INSUFFICIENT_FUNDS
        if not in_bound(settle[0] + r.amount):
            return ST_INVALID_AMOUNT
        a.balance -= r.amount
        settle[0] += r.amount
    set_available(ans, a)
    return ST_APPROVED


cdef uint8_t spend_checks(State* S, Account* a, uint32_t row, Request* r, Answer* ans, int64_t now,
                          uint8_t channel, uint64_t merchant, bint may_partial,
                          int64_t* approved, int64_t* score) noexcept nogil:
    """SPEC §4 steps 2-7 for the spender; sets approved and score."""
    cdef int64_t av
    if a.status != AS_ACTIVE:
        return ST_ACCOUNT_INACTIVE
    if a.kind != KIND_WALLET:
        return ST_NOT_PERMITTED
    if a.single_limit > 0 and r.amount > a.single_limit:
        return ST_LIMIT_EXCEEDED
    if a.daily_limit > 0 and spent_on(a, now) + r.amount > a.daily_limit:
        return ST_LIMIT_EXCEEDED
    if S.rules.enabled:
        score[0] = fraud_score(S, a, row, r, now, channel, merchant)
        if score[0] >= S.rules.decline_score:
            return ST_SUSPECTED_FRAUD
    av = available(a)
    approved[0] = r.amount
    if r.amount > av:
        if may_partial and av > 0:
            approved[0] = av
            return ST_PARTIAL
        return ST_INSUFFICIENT_FUNDS
    return ST_APPROVED


cdef inline void note_spend(Account* a, int64_t now, int64_t approved) noexcept nogil:
    add_spent(a, now, approved)
    a.spend_count += 1
    ac_add128(&a.spend_total_lo, &a.spend_total_hi, approved)


cdef uint8_t refused_attempt(State* S, Request* r, uint8_t st, int64_t now, uint64_t merchant,
                            bint in_its_currency) noexcept nogil:
    """Refuse with ``st`` (invalid_request or invalid_amount) a spend that may
    still be an attempt: SPEC §10.3 counts an authorize or purchase naming an
    existing account in its currency, or a transfer from an existing sender,
    "whatever its answer", so probes with bad amounts count for velocity
    and card_testing too.  Nothing else changes."""
    cdef uint32_t row
    cdef Account* a
    if r.account != 0:
        a = account_of(S, r.account, &row)
        if a != NULL and (not in_its_currency or r.currency == a.currency):
            record_attempt(S, a, row, merchant, r.amount, now, True)
    return st


cdef uint8_t op_spend(State* S, Request* r, Answer* ans, int64_t now, bint purchase) noexcept nogil:
    cdef uint32_t row
    cdef Account* a
    cdef Hold* h
    cdef int64_t approved = 0
    cdef int64_t score = 0
    cdef int32_t credited = -1
    cdef int64_t* cbal
    cdef uint8_t st
    if r.id == 0 or r.account == 0 or r.to == 0 or r.channel > CH_P2P:
        return refused_attempt(S, r, ST_INVALID_REQUEST, now, r.to, True)
    if S.remembered_head != 0 and ix_find(&S.hold_index, r.id) != 0:
        # id reused after the idempotency memory forgot it
        return refused_attempt(S, r, ST_INVALID_REQUEST, now, r.to, True)
    if not amount_ok(r.amount):
        return refused_attempt(S, r, ST_INVALID_AMOUNT, now, r.to, True)
    a = account_of(S, r.account, &row)
    if a == NULL:
        return ST_NO_ACCOUNT
    set_available(ans, a)
    if r.currency != a.currency:
        return ST_CURRENCY_MISMATCH
    st = spend_checks(S, a, row, r, ans, now, r.channel, r.to, r.flags & FLAG_ALLOW_PARTIAL, &approved, &score)
    if (st == ST_APPROVED or st == ST_PARTIAL) and purchase:
        credited = merchant_account_row(S, r.to, a.currency)
        if credited != <int32_t>row:
            cbal = credited_balance(S, credited, a.currency)
            if not in_bound(cbal[0] + approved):
                st = ST_INVALID_AMOUNT
    if st == ST_APPROVED or st == ST_PARTIAL:
        h = new_hold(S, r.id, row, r.to, now)
        if purchase:
            a.balance -= approved
            cbal = credited_balance(S, credited, a.currency)
            cbal[0] += approved
            h.state = HS_CAPTURED
            h.captured = approved
            h.credited = credited
        else:
            a.held += approved
            h.remaining = approved
            h.state = HS_OPEN
        note_spend(a, now, approved)
        if r.channel == CH_QR or r.channel == CH_CARD_PRESENT:
            a.travel_stamp = now
            a.travel_country = r.country
        ans.approved_amount = approved
        ans.review = S.rules.enabled and score >= S.rules.review_score
    record_attempt(S, a, row, r.to, r.amount, now, not (st == ST_APPROVED or st == ST_PARTIAL))
    set_available(ans, a)
    return st


cdef uint8_t op_transfer(State* S, Request* r, Answer* ans, int64_t now) noexcept nogil:
    cdef uint32_t row, to_row
    cdef Account* a
    cdef Account* b
    cdef int64_t approved = 0
    cdef int64_t score = 0
    cdef uint8_t st
    if r.id == 0 or r.account == 0 or r.to == 0 or r.to == r.account:
        return refused_attempt(S, r, ST_INVALID_REQUEST, now, 0, False)
    if not amount_ok(r.amount):
        return refused_attempt(S, r, ST_INVALID_AMOUNT, now, 0, False)
    a = account_of(S, r.account, &row)
    if a == NULL:
        return ST_NO_ACCOUNT
    set_available(ans, a)
    b = account_of(S, r.to, &to_row)
    if r.currency != 0 and r.currency != a.currency:
        st = ST_CURRENCY_MISMATCH
    elif b == NULL:
        st = ST_NO_ACCOUNT
    elif b.currency != a.currency:
        st = ST_CURRENCY_MISMATCH
    elif b.status != AS_ACTIVE:
        st = ST_ACCOUNT_INACTIVE
    else:
        st = spend_checks(S, a, row, r, ans, now, CH_P2P, 0, False, &approved, &score)
        if st == ST_APPROVED and not in_bound(b.balance + approved):
            st = ST_INVALID_AMOUNT
    if st == ST_APPROVED:
        a.balance -= approved
        b.balance += approved
        note_spend(a, now, approved)
        ans.approved_amount = approved
        ans.review = S.rules.enabled and score >= S.rules.review_score
    record_attempt(S, a, row, 0, r.amount, now, st != ST_APPROVED)
    set_available(ans, a)
    return st


cdef uint8_t named_hold(State* S, Request* r, Answer* ans, bint zero_amount_ok, Hold** out) noexcept nogil:
    """The checks every request naming a hold starts with, in SPEC order (id
    and auth, amount, the hold); sets ``out`` (NULL on failure, with the
    status returned) and the answer's available."""
    out[0] = NULL
    if r.id == 0 or r.account == 0:
        return ST_INVALID_REQUEST
    if not (amount_ok(r.amount) or (zero_amount_ok and r.amount == 0)):
        return ST_INVALID_AMOUNT
    cdef Hold* h = hold_of(S, r.account)
    if h == NULL:
        return ST_NO_AUTH
    set_available(ans, &S.accounts[h.account])
    out[0] = h
    return ST_APPROVED


cdef uint8_t op_increment(State* S, Request* r, Answer* ans, int64_t now) noexcept nogil:
    cdef Hold* h
    cdef Account* a
    cdef uint8_t st = named_hold(S, r, ans, False, &h)
    if h == NULL:
        return st
    a = &S.accounts[h.account]
    if h.state != HS_OPEN:
        return ST_AUTH_CLOSED
    if a.status != AS_ACTIVE:
        return ST_ACCOUNT_INACTIVE
    if a.single_limit > 0 and h.remaining + r.amount > a.single_limit:
        return ST_LIMIT_EXCEEDED
    if a.daily_limit > 0 and spent_on(a, now) + r.amount > a.daily_limit:
        return ST_LIMIT_EXCEEDED
    if r.amount > available(a):
        return ST_INSUFFICIENT_FUNDS
    h.remaining += r.amount
    a.held += r.amount
    add_spent(a, now, r.amount)
    ans.approved_amount = r.amount
    set_available(ans, a)
    return ST_APPROVED


cdef uint8_t op_capture_void(State* S, Request* r, Answer* ans, bint capture) noexcept nogil:
    cdef Hold* h
    cdef Account* a
    cdef int64_t amount
    cdef int32_t credited
    cdef int64_t* cbal
    cdef uint8_t st = named_hold(S, r, ans, True, &h)  # amount 0: the whole remaining
    if h == NULL:
        return st
    a = &S.accounts[h.account]
    if h.state != HS_OPEN:
        return ST_AUTH_CLOSED
    if r.amount > h.remaining:
        return ST_AMOUNT_EXCEEDS_HOLD
    amount = r.amount if r.amount != 0 else h.remaining
    if capture:
        credited = merchant_account_row(S, h.merchant, a.currency)
        cbal = credited_balance(S, credited, a.currency)
        if credited != <int32_t>h.account and not in_bound(cbal[0] + amount):
            return ST_INVALID_AMOUNT
        a.balance -= amount
        a.held -= h.remaining
        cbal[0] += amount
        h.remaining = 0
        h.captured = amount
        h.credited = credited
        h.state = HS_CAPTURED
    else:
        a.held -= amount
        h.remaining -= amount
        if h.remaining == 0:
            h.state = HS_VOIDED
    ans.approved_amount = amount
    set_available(ans, a)
    return ST_APPROVED


cdef uint8_t op_refund(State* S, Request* r, Answer* ans) noexcept nogil:
    cdef Hold* h
    cdef Account* a
    cdef int64_t* cbal
    cdef uint8_t st = named_hold(S, r, ans, False, &h)
    if h == NULL:
        return st
    a = &S.accounts[h.account]
    if h.state != HS_CAPTURED:
        return ST_NOT_CAPTURED
    if a.status == AS_CLOSED:
        return ST_ACCOUNT_INACTIVE
    if h.refunded + r.amount > h.captured:
        return ST_AMOUNT_EXCEEDS_CAPTURE
    cbal = credited_balance(S, h.credited, a.currency)
    if h.credited != <int32_t>h.account:
        if not in_bound(a.balance + r.amount) or not in_bound(cbal[0] - r.amount):
            return ST_INVALID_AMOUNT
    a.balance += r.amount
    cbal[0] -= r.amount
    h.refunded += r.amount
    ans.approved_amount = r.amount
    set_available(ans, a)
    return ST_APPROVED


cdef bint reverses_purchase(State* S, Request* r) noexcept nogil:
    """An ISO 8583 reversal without field 90 (FLAG_OR_PURCHASE) names the
    0100's hold; when there is none but the 0200's, it reverses the
    purchase.  Decided here, in the batch's order, so a 0200 decided just
    before it in the same batch counts, and replay decides alike."""
    return ((r.flags & FLAG_OR_PURCHASE) != 0 and r.to != 0 and r.id != 0
            and hold_of(S, r.account) == NULL and hold_of(S, r.to) != NULL)


cdef uint8_t op_purchase_reversal(State* S, Request* r, Answer* ans) noexcept nogil:
    """The refund of purchase hold ``r.to`` that reverses_purchase chose:
    ``single_limit`` (field 4's amount), or with 0 all still refundable
    (nothing left: 1, which op_refund answers amount_exceeds_capture)."""
    cdef Request q = r[0]
    cdef Hold* h = hold_of(S, r.to)
    q.op = OP_REFUND
    q.account = r.to
    q.amount = r.single_limit if r.single_limit > 0 else max(h.captured - h.refunded, <int64_t>1)
    return op_refund(S, &q, ans)


cdef uint8_t op_admin(State* S, Request* r, Answer* ans) noexcept nogil:
    """set_limits, freeze, unfreeze, close, issue_card."""
    cdef uint32_t row
    cdef Account* a
    cdef uint8_t op = r.op
    if r.id == 0 or r.account == 0:
        return ST_INVALID_REQUEST
    if op == OP_SET_LIMITS:
        if (r.flags & FLAG_SET_CREDIT) and not limit_ok(r.amount):
            return ST_INVALID_AMOUNT
        if (r.flags & FLAG_SET_SINGLE) and not limit_ok(r.single_limit):
            return ST_INVALID_AMOUNT
        if (r.flags & FLAG_SET_DAILY) and not limit_ok(r.daily_limit):
            return ST_INVALID_AMOUNT
    a = account_of(S, r.account, &row)
    if a == NULL:
        return ST_NO_ACCOUNT
    set_available(ans, a)
    if r.currency != 0 and r.currency != a.currency:
        return ST_CURRENCY_MISMATCH
    if op == OP_CLOSE:
        if a.held != 0 or a.balance != 0:
            return ST_ACCOUNT_NOT_EMPTY
        a.status = AS_CLOSED
        return ST_APPROVED
    if a.status == AS_CLOSED:
        return ST_ACCOUNT_INACTIVE
    if op == OP_SET_LIMITS:
        if r.flags & FLAG_SET_CREDIT:
            a.credit_limit = r.amount
        if r.flags & FLAG_SET_SINGLE:
            a.single_limit = r.single_limit
        if r.flags & FLAG_SET_DAILY:
            a.daily_limit = r.daily_limit
        set_available(ans, a)
        return ST_APPROVED
    if op == OP_FREEZE:
        a.status = AS_FROZEN
        return ST_APPROVED
    if op == OP_UNFREEZE:
        a.status = AS_ACTIVE
        return ST_APPROVED
    return op_issue_card(S, r, a)


cdef Card* card_find(State* S, const uint8_t* pan_hash) noexcept nogil:
    """Cards are keyed by the first 8 hash bytes; the other 24 settle ties."""
    cdef uint64_t key
    memcpy(&key, pan_hash, 8)
    cdef Index* ix = &S.card_index
    cdef uint64_t h = ix_hash(key) & ix.mask
    cdef uint64_t v
    cdef Card* c
    while True:
        v = ix.slots[h] & IX_VALUE_MASK
        if v == 0:
            return NULL
        c = &S.cards[v - 1]
        if c.key == key and memcmp(c.rest, pan_hash + 8, 24) == 0:
            return c
        h = (h + 1) & ix.mask


cdef uint8_t op_issue_card(State* S, Request* r, Account* a) noexcept nogil:
    cdef const uint8_t* pan_hash = <const uint8_t*>&r.to
    cdef uint8_t zero[32]
    cdef Card* card
    memset(zero, 0, 32)
    if memcmp(pan_hash, zero, 32) == 0:
        return ST_INVALID_CARD
    card = card_find(S, pan_hash)
    if card != NULL:
        if card.account != a.id:
            return ST_INVALID_CARD
        return ST_APPROVED
    card = &S.cards[S.card_count]
    memcpy(card, pan_hash, 32)
    card.account = a.id
    S.card_count += 1
    ix_insert(&S.card_index, card.key, S.card_count)
    return ST_APPROVED


cdef uint8_t op_query(State* S, Request* r, Answer* ans) noexcept nogil:
    cdef uint32_t row
    cdef Account* a
    if r.account == 0:
        return ST_INVALID_REQUEST
    a = account_of(S, r.account, &row)
    if a == NULL:
        return ST_NO_ACCOUNT
    set_available(ans, a)
    ans.balance = a.balance
    ans.credit_limit = a.credit_limit
    ans.held = a.held
    ans.account_status = a.status
    return ST_APPROVED


cdef inline void remember(State* S, Answer* ans) noexcept nogil:
    cdef uint64_t seq = S.remembered_tail
    cdef Remembered* m = &S.remembered[seq & S.remembered_rowmask]
    m.id = ans.id
    m.stamp = ans.stamp
    m.available = ans.available
    m.approved_amount = ans.approved_amount
    m.status = ans.status
    m.review = ans.review
    m.has_available = ans.has_available
    m.op = ans.op
    memset(m._pad, 0, 4)
    S.remembered_tail = seq + 1
    ix_insert(&S.remembered_index, ans.id, ring_value(seq))


cdef void named_available(State* S, Request* r, Answer* ans) noexcept nogil:
    """SPEC §10.12: an answer naming an existing account carries its
    available, even when the request failed before the account check."""
    cdef uint32_t row
    cdef Account* a = NULL
    cdef Hold* h
    if r.account == 0 or (r.flags & FLAG_NO_CARD):
        return
    if names_hold(r.op):
        h = hold_of(S, r.account)
        if h != NULL:
            a = &S.accounts[h.account]
    else:
        a = account_of(S, r.account, &row)
    if a != NULL:
        set_available(ans, a)


cdef void decide_one(State* S, Request* r, Answer* ans, int64_t now) noexcept nogil:
    cdef uint64_t v
    cdef Remembered* m
    cdef uint8_t op = r.op
    cdef uint8_t st
    memset(ans, 0, sizeof(Answer))
    ans.id = r.id
    ans.op = op
    ans.stamp = now
    expire_until(S, now)
    if op == OP_QUERY:
        ans.stamp = 0
        ans.status = op_query(S, r, ans)
        return
    if r.id != 0:
        v = ix_find(&S.remembered_index, r.id)
        if v != 0:
            m = &S.remembered[(v - 1) & S.remembered_rowmask]
            ans.stamp = m.stamp
            ans.available = m.available
            ans.approved_amount = m.approved_amount
            ans.status = m.status
            ans.review = m.review
            ans.has_available = m.has_available
            ans.op = m.op
            return
    if op == OP_AUTHORIZE or op == OP_PURCHASE:
        if r.flags & FLAG_NO_CARD:
            st = ST_INVALID_REQUEST if r.id == 0 else ST_NO_ACCOUNT
        else:
            st = op_spend(S, r, ans, now, op == OP_PURCHASE)
    elif op == OP_TRANSFER:
        st = op_transfer(S, r, ans, now)
    elif op == OP_CAPTURE:
        st = op_capture_void(S, r, ans, True)
    elif op == OP_VOID:
        if reverses_purchase(S, r):
            ans.op = OP_REFUND  # remembered so: a retransmission's answer says the same
            st = op_purchase_reversal(S, r, ans)
        else:
            st = op_capture_void(S, r, ans, False)
    elif op == OP_INCREMENT:
        st = op_increment(S, r, ans, now)
    elif op == OP_REFUND:
        st = op_refund(S, r, ans)
    elif op == OP_DEPOSIT:
        st = op_deposit_withdraw(S, r, ans, True)
    elif op == OP_WITHDRAW:
        st = op_deposit_withdraw(S, r, ans, False)
    elif op == OP_OPEN:
        st = op_open(S, r, ans, now)
    elif OP_SET_LIMITS <= op <= OP_ISSUE_CARD:
        st = op_admin(S, r, ans)
    else:
        ans.status = ST_BAD_REQUEST
        return
    ans.status = st
    if (st == ST_INVALID_REQUEST or st == ST_INVALID_AMOUNT) and not ans.has_available:
        named_available(S, r, ans)
    if st != ST_APPROVED and st != ST_PARTIAL:
        ans.approved_amount = 0
        ans.review = 0
    if r.id != 0:
        remember(S, ans)


# --- prefetching -----------------------------------------------------------
# A request touches ~8 random cache lines (index slots, the account row, its
# fraud ring, the hold slot...).  One at a time that is ~8 serial DRAM
# misses; prefetching in three stages ahead (slots, then the rows the slots
# point at, then rows those rows point at) overlaps them.  Prefetches are
# hints only: they read state that may change before the request is
# decided, and never affect an answer.

cdef int PREFETCH_SLOTS = 24   # requests ahead: index slots
cdef int PREFETCH_ROWS = 12    # requests ahead: rows the slots point at
cdef int PREFETCH_RINGS = 4    # requests ahead: fraud rings of those rows
cdef int EVICT_SLOTS = 16      # evictions ahead: the evicted entry's home slot
cdef int REBUILD_AHEAD = 16    # rows ahead when an index is rebuilt from a snapshot


cdef inline uint64_t* slot_of(Index* ix, uint64_t key) noexcept nogil:
    return &ix.slots[ix_hash(key) & ix.mask]


cdef inline uint64_t home_value(Index* ix, uint64_t key) noexcept nogil:
    """The value in the key's home slot: its own value when it sits there."""
    return slot_of(ix, key)[0] & IX_VALUE_MASK


cdef inline void prefetch_slots(State* S, Request* r) noexcept nogil:
    cdef uint8_t op = r.op
    if r.id != 0:
        ac_prefetch(slot_of(&S.remembered_index, r.id))
    if names_hold(op):
        ac_prefetch(slot_of(&S.hold_index, r.account))
        return
    ac_prefetch(slot_of(&S.account_index, r.account))
    if op == OP_AUTHORIZE or op == OP_PURCHASE:
        ac_prefetch(slot_of(&S.hold_index, r.id))
        ac_prefetch(slot_of(&S.merchant_index, r.to))
    elif op == OP_TRANSFER:
        ac_prefetch(slot_of(&S.account_index, r.to))


cdef inline Account* guess_account(State* S, Request* r) noexcept nogil:
    """The row the request most likely names (first probe only)."""
    cdef uint64_t v
    cdef Hold* h
    if names_hold(r.op):
        v = home_value(&S.hold_index, r.account)
        if v == 0:
            return NULL
        h = &S.holds[(v - 1) & S.hold_rowmask]
        return &S.accounts[h.account]
    v = home_value(&S.account_index, r.account)
    if v == 0 or v > S.account_count:
        return NULL
    return &S.accounts[v - 1]


cdef inline void prefetch_rows(State* S, Request* r) noexcept nogil:
    cdef uint64_t v, k
    cdef char* p
    if names_hold(r.op):
        v = home_value(&S.hold_index, r.account)
        if v != 0:
            ac_prefetch(&S.holds[(v - 1) & S.hold_rowmask])
        return
    v = home_value(&S.account_index, r.account)
    if v != 0 and v <= S.account_count:
        p = <char*>&S.accounts[v - 1]
        ac_prefetch(p)
        ac_prefetch(p + 64)
    if r.op == OP_AUTHORIZE or r.op == OP_PURCHASE:
        v = home_value(&S.merchant_index, r.to)
        if v != 0:  # the whole ring: merchant_burst scans all of it
            p = <char*>(S.merchants + (v - 1) * S.merchant_width)
            for k in range(0, S.merchant_width * sizeof(int64_t), 64):
                ac_prefetch(p + k)
    elif r.op == OP_TRANSFER:
        v = home_value(&S.account_index, r.to)
        if v != 0 and v <= S.account_count:
            ac_prefetch(&S.accounts[v - 1])


cdef inline void prefetch_rings(State* S, Request* r) noexcept nogil:
    cdef Account* a = guess_account(S, r)
    cdef char* p
    cdef uint64_t k
    if a == NULL:
        return
    if names_hold(r.op):
        ac_prefetch(a)
        return
    if a.activity != 0 and a.activity <= S.act_high:
        p = <char*>(S.act + (a.activity - 1) * S.act_width)
        for k in range(0, S.act_width * sizeof(int64_t), 64):
            ac_prefetch(p + k)


cdef void decide_batch(State* S, Request* reqs, Answer* answers, Py_ssize_t n, int64_t stamp0) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(min(n, PREFETCH_SLOTS)):
        prefetch_slots(S, &reqs[i])
    for i in range(min(n, PREFETCH_ROWS)):
        prefetch_rows(S, &reqs[i])
    for i in range(n):
        if i + PREFETCH_SLOTS < n:
            prefetch_slots(S, &reqs[i + PREFETCH_SLOTS])
        if i + PREFETCH_ROWS < n:
            prefetch_rows(S, &reqs[i + PREFETCH_ROWS])
        if i + PREFETCH_RINGS < n:
            prefetch_rings(S, &reqs[i + PREFETCH_RINGS])
        decide_one(S, &reqs[i], &answers[i], stamp0 + i)


# --- layout pinning -----------------------------------------------------------

cdef Py_ssize_t _off(void* field, void* base):
    return <char*>field - <char*>base


def _check_layout():
    """Each C struct must match its numpy dtype byte for byte."""
    cdef Request rq
    cdef Answer an
    cdef Account ac
    cdef Hold ho
    cdef Remembered re
    cdef Card ca
    assert sizeof(Request) == C.REQUEST_DTYPE.itemsize
    assert sizeof(Answer) == C.ANSWER_DTYPE.itemsize
    assert sizeof(Account) == ACCOUNT_DTYPE.itemsize
    assert sizeof(Hold) == HOLD_DTYPE.itemsize
    assert sizeof(Remembered) == REMEMBERED_DTYPE.itemsize
    assert sizeof(Card) == CARD_DTYPE.itemsize
    checks = [
        (C.REQUEST_DTYPE, "to", _off(&rq.to, &rq)),
        (C.REQUEST_DTYPE, "currency", _off(&rq.currency, &rq)),
        (C.REQUEST_DTYPE, "flags", _off(&rq.flags, &rq)),
        (C.ANSWER_DTYPE, "held", _off(&an.held, &an)),
        (C.ANSWER_DTYPE, "has_available", _off(&an.has_available, &an)),
        (ACCOUNT_DTYPE, "travel_stamp", _off(&ac.travel_stamp, &ac)),
        (ACCOUNT_DTYPE, "activity", _off(&ac.activity, &ac)),
        (ACCOUNT_DTYPE, "kind", _off(&ac.kind, &ac)),
        (HOLD_DTYPE, "account", _off(&ho.account, &ho)),
        (HOLD_DTYPE, "state", _off(&ho.state, &ho)),
        (REMEMBERED_DTYPE, "op", _off(&re.op, &re)),
        (CARD_DTYPE, "account", _off(&ca.account, &ca)),
    ]
    for dtype, name, off in checks:
        assert dtype.fields[name][1] == off, (name, off)
    for name in ("open", "authorize", "query", "issue_card", "transfer"):
        assert int(getattr(C.Op, name)) == {"open": OP_OPEN, "authorize": OP_AUTHORIZE, "query": OP_QUERY,
                                             "issue_card": OP_ISSUE_CARD, "transfer": OP_TRANSFER}[name]
    assert int(C.Status.account_not_empty) == ST_ACCOUNT_NOT_EMPTY
    assert int(C.Status.bad_request) == ST_BAD_REQUEST
    assert int(C.FLAG_NO_CARD) == FLAG_NO_CARD
    assert int(C.FLAG_OR_PURCHASE) == FLAG_OR_PURCHASE


_check_layout()


def _table(shape, dtype):
    """Zeroed array whose rows start on cache-line boundaries.

    numpy's large arrays start 16 bytes into a page (glibc's chunk header),
    so a 128-byte row spanned three cache lines and a 64-byte one two.
    Tables of a huge page or more start on a huge-page boundary as well, so
    the kernel can back them with 2 MiB pages from the first byte.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    align = HUGE_PAGE_BYTES if nbytes >= HUGE_PAGE_BYTES else CACHE_LINE_BYTES
    buf = np.zeros(nbytes + align, np.uint8)
    start = -buf.ctypes.data % align
    out = buf[start : start + nbytes].view(dtype).reshape(shape)
    assert out.ctypes.data % align == 0
    return out


def _index_table(n):
    """A zeroed index slot table (n uint64) in a mapping of its own that
    forked children do not inherit (``MADV_DONTFORK``).

    A snapshot child writes rows only; the indexes are rebuilt at load.
    Shared with the child, each random write the parent made into an index
    while the child ran took a copy-on-write fault (a 4 KiB copy), and the
    indexes are the bulk of the random writes.  Its own mmap, not malloc:
    DONTFORK on heap pages would outlive the table and hide unrelated
    objects from the child.
    """
    nbytes = max(int(n), 1) * 8
    align = HUGE_PAGE_BYTES if nbytes >= HUGE_PAGE_BYTES else mmap.PAGESIZE
    m = mmap.mmap(-1, nbytes + align, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for advice in ("MADV_DONTFORK", "MADV_HUGEPAGE" if nbytes >= HUGE_PAGE_BYTES else None):
        if advice and hasattr(mmap, advice):
            try:
                m.madvise(getattr(mmap, advice))
            except OSError:  # a kernel without it: only slower
                pass
    buf = np.frombuffer(m, np.uint8)  # keeps the mapping alive
    start = -buf.ctypes.data % align
    out = buf[start : start + nbytes].view(np.uint64)[: int(n)]
    assert out.ctypes.data % align == 0
    return out


# Counters a state import needs (merchant_hand is optional: older images
# lack it and it starts at 0).
IMPORT_COUNTERS = frozenset({"account_count", "merchant_count", "card_count", "act_high", "act_hand", "hold_head",
                             "hold_tail", "hold_expire", "remembered_head", "remembered_tail"})


def _bytes(a):
    """A contiguous array's bytes as a flat uint8 view (no copy)."""
    assert a.flags.c_contiguous
    return a.reshape(-1).view(np.uint8)


def _ring_runs(ring, uint64_t head, uint64_t tail):
    """Ring rows head..tail (at seq & mask) as views in seq order: one or
    two runs (one empty view when the ring is empty)."""
    cdef uint64_t cap = len(ring)
    assert tail - head <= cap
    runs = []
    seq = head
    while seq < tail:
        o = seq & (cap - 1)
        run = min(tail - seq, cap - o)
        runs.append(ring[o : o + run])
        seq += run
    return runs or [ring[:0]]


def _ring_rows(runs, copy):
    """The runs as one array: a view when there is one run and no copy is
    asked for, else one copy (of slices, never a gather by index)."""
    if len(runs) == 1:
        return runs[0].copy() if copy else runs[0]
    return np.concatenate(runs)


def _ring_pieces(ring, uint64_t head, uint64_t tail):
    """_ring_runs as uint8 views (where a snapshot's ring bytes go)."""
    return [_bytes(r) for r in _ring_runs(ring, head, tail)]


def populate(arrays, stop=None):
    """Fault in every page of each array, writable, without writing to it
    (``MADV_POPULATE_WRITE``, Linux 5.14+): safe while another thread
    fills the same pages.  Recovery runs it on a second core ahead of the
    snapshot reader: first touches of fresh memory were most of a 10M-
    account recovery on this VM, and they fault about twice as fast on
    two cores.  ``stop`` (a uint8 array) set to 1 ends it at the next
    step.  Returns False where the kernel lacks the advice."""
    cdef uintptr_t start, end
    cdef size_t step = POPULATE_CHUNK_BYTES
    cdef size_t at, n
    cdef int rc = 0
    cdef uint8_t never = 0
    cdef volatile uint8_t* halt = &never
    if stop is not None:
        assert stop.dtype == np.uint8 and len(stop) >= 1
        halt = <volatile uint8_t*><uintptr_t>stop.ctypes.data
    for a in arrays:
        if a.nbytes == 0:
            continue
        start = <uintptr_t>a.ctypes.data & ~(<uintptr_t>PAGE_BYTES - 1)
        end = <uintptr_t>a.ctypes.data + <uintptr_t>a.nbytes
        at = 0
        with nogil:
            while start + at < end and rc == 0 and halt[0] == 0:
                n = min(step, end - start - at)
                rc = madvise(<void*>(start + at), n, MADV_POPULATE_WRITE)
                at += n
        if rc != 0:
            return False
    return True


def _touch_all(spans):
    """Fault in each uint8 span, keeping contents (populate, or ac_touch
    on kernels without MADV_POPULATE_WRITE)."""
    cdef cnp.ndarray a
    for span in spans:
        if populate([span]):
            continue
        a = span
        with nogil:
            ac_touch(<char*>cnp.PyArray_DATA(a), <size_t>cnp.PyArray_NBYTES(a), PAGE_BYTES)


def _pow2_at_least(n):
    p = ROWS_INITIAL
    while p < n:
        p <<= 1
    return p


cdef uint64_t _index_errors(Index* ix) noexcept nogil:
    """Slots whose stored tag disagrees with their key: each entry's home
    (from its key) must equal slot_home, and no empty slot may lie between
    them (the probe chain)."""
    cdef uint64_t p, s, hsh, home, q
    cdef uint64_t bad = 0
    for p in range(ix.mask + 1):
        s = ix.slots[p]
        if s == 0:
            continue
        hsh = ix_hash(ix_key(ix, s & IX_VALUE_MASK))
        home = hsh & ix.mask
        if home != slot_home(ix, p, s) or (s & ~IX_VALUE_MASK) != ix_tag(hsh):
            bad += 1
            continue
        q = home
        while q != p:
            if ix.slots[q] == 0:
                bad += 1
                break
            q = (q + 1) & ix.mask
    return bad


# --- the Python-facing kernel -------------------------------------------------

def auth_codes(ids):
    """``records.auth_code`` of every id at once (bytes ``S6``), by the
    codecs' C version (put_auth_code, _kernel.pxd): batch answers' column."""
    cdef const uint64_t[::1] v = np.ascontiguousarray(ids, np.uint64)
    cdef Py_ssize_t i, n = v.shape[0]
    out = np.zeros(n, f"S{AUTH_CODE_CHARS}")
    cdef uint8_t[::1] b = out.view(np.uint8)
    for i in range(n):
        put_auth_code(&b[i * AUTH_CODE_CHARS], v[i])
    return out


cdef class Kernel:
    """All state of one shard and the batch decision function.

    Not thread-safe by design: exactly one writer calls ``decide``.
    """

    cdef State S
    cdef object accounts, account_slots
    cdef object holds, hold_slots
    cdef object remembered, remembered_slots
    cdef object merchants, merchant_slots
    cdef object cards, card_slots
    cdef object act, settlement, risky
    cdef public object rules_dict
    cdef object initial
    cdef public uint64_t remembered_max
    cdef public uint64_t holds_retained_max

    def __cinit__(self, dict rules, uint64_t remembered_max=C.idempotency_ids_max_default,
                  uint64_t holds_retained_max=C.holds_retained_max_default, dict initial=None):
        memset(&self.S, 0, sizeof(State))
        self.remembered_max = remembered_max
        self.holds_retained_max = holds_retained_max
        self.settlement = np.zeros(C.currency_max + 1, np.int64)
        self.risky = np.zeros(C.mcc_max + 1, np.uint8)
        self._set_rules(rules)
        # Static allocation where the operator knows the scale (TigerBeetle's
        # way): growth beyond these sizes works but stops the world to copy
        # and rehash.  np.zeros is calloc: untouched pages cost nothing.
        initial = initial or {}
        self.initial = initial
        n = ROWS_INITIAL
        na = _pow2_at_least(initial.get("accounts", n))
        nh = _pow2_at_least(initial.get("holds", n))
        nr = _pow2_at_least(initial.get("ids", n))
        self.accounts = _table(na, ACCOUNT_DTYPE)
        self.holds = _table(nh, HOLD_DTYPE)
        self.remembered = _table(nr, REMEMBERED_DTYPE)
        self.merchants = _table((n, self.S.merchant_width), np.int64)
        self.cards = _table(n, CARD_DTYPE)
        self.act = _table((na, self.S.act_width), np.int64)
        self.account_slots = _index_table(2 * na)
        self.hold_slots = _index_table(2 * nh)
        self.remembered_slots = _index_table(2 * nr)
        self.merchant_slots = _index_table(2 * n)
        self.card_slots = _index_table(2 * n)
        self._bind()

    def _set_rules(self, dict d):
        """Install §5 settings (seconds → µs).  Ring widths follow them."""
        f = d["fraud"]
        cdef Rules* R = &self.S.rules
        R.enabled = bool(f["enabled"])
        R.decline_score = f["decline_score"]
        R.review_score = f["review_score"]
        R.velocity_window = f["velocity"]["window_seconds"] * US_PER_S
        R.velocity_attempts = f["velocity"]["attempts"]
        R.velocity_points = f["velocity"]["points"]
        R.card_window = f["card_testing"]["window_seconds"] * US_PER_S
        R.card_attempts = f["card_testing"]["attempts"]
        R.card_max_amount = f["card_testing"]["max_amount"]
        R.card_points = f["card_testing"]["points"]
        R.spike_min_approved = f["amount_spike"]["min_approved"]
        R.spike_min_amount = f["amount_spike"]["min_amount"]
        R.spike_factor = f["amount_spike"]["factor"]
        R.spike_points = f["amount_spike"]["points"]
        R.travel_window = f["impossible_travel"]["window_seconds"] * US_PER_S
        R.travel_points = f["impossible_travel"]["points"]
        R.new_age = f["new_account"]["age_seconds"] * US_PER_S
        R.new_min_amount = f["new_account"]["min_amount"]
        R.new_points = f["new_account"]["points"]
        R.mcc_points = f["risky_mcc"]["points"]
        R.burst_window = f["merchant_burst"]["window_seconds"] * US_PER_S
        R.burst_last = f["merchant_burst"]["last_attempts"]
        R.burst_declines = f["merchant_burst"]["declines"]
        R.burst_points = f["merchant_burst"]["points"]
        R.hold_ttl = d["hold_ttl_seconds"] * US_PER_S
        R.activity_window = max(R.velocity_window, R.card_window)
        assert 1 <= R.velocity_attempts <= C.ring_size_max
        assert 1 <= R.card_attempts <= C.ring_size_max
        assert 1 <= R.burst_last <= C.ring_size_max
        self.risky[:] = 0
        for m in f["risky_mcc"]["mccs"]:
            self.risky[m] = 1
        width = ACT_HEADER + R.velocity_attempts + R.card_attempts
        self.S.act_width = -(-width // ACT_ROW_ALIGN_WORDS) * ACT_ROW_ALIGN_WORDS
        self.S.merchant_width = M_HEADER + R.burst_last
        self.rules_dict = d

    def set_rules(self, dict d):
        """Change decision settings (a CONFIG log record).  Rings are rebuilt
        only if their sizes change, which forgets recent attempts.  The
        activity row's width is padded to whole cache lines, so compare the
        ring sizes, not the width: (3, 3) -> (5, 2) keeps 8 words, and old
        ring positions would then index past the new card ring into the
        next account's row."""
        old_rings = (self.S.rules.velocity_attempts, self.S.rules.card_attempts)
        old_m = self.S.merchant_width
        self._set_rules(d)
        if (self.S.rules.velocity_attempts, self.S.rules.card_attempts) != old_rings:
            self.act = _table((len(self.act), self.S.act_width), np.int64)
            self.S.act_high = 0
            self.S.act_hand = 0
            self.accounts["activity"] = 0
        if self.S.merchant_width != old_m:
            old = self.merchants[: self.S.merchant_count]
            self.merchants = _table((len(self.merchants), self.S.merchant_width), np.int64)
            self.merchants[: self.S.merchant_count, 0] = old[:, 0]
        self._bind()

    cdef void _bind_index(self, Index* ix, object slots, char* rows, uint64_t stride, uint64_t rowmask):
        cdef cnp.ndarray s = slots
        ix.slots = <uint64_t*>cnp.PyArray_DATA(s)
        ix.mask = <uint64_t>len(slots) - 1
        ix.rows = rows
        ix.stride = stride
        ix.rowmask = rowmask

    cdef void _bind(self):
        """Refresh every raw pointer after arrays were (re)allocated."""
        cdef State* S = &self.S
        S.accounts = <Account*>cnp.PyArray_DATA(<cnp.ndarray>self.accounts)
        S.holds = <Hold*>cnp.PyArray_DATA(<cnp.ndarray>self.holds)
        S.hold_rowmask = len(self.holds) - 1
        S.remembered = <Remembered*>cnp.PyArray_DATA(<cnp.ndarray>self.remembered)
        S.remembered_rowmask = len(self.remembered) - 1
        S.merchants = <int64_t*>cnp.PyArray_DATA(<cnp.ndarray>self.merchants)
        S.cards = <Card*>cnp.PyArray_DATA(<cnp.ndarray>self.cards)
        S.act = <int64_t*>cnp.PyArray_DATA(<cnp.ndarray>self.act)
        S.settlement = <int64_t*>cnp.PyArray_DATA(<cnp.ndarray>self.settlement)
        S.risky_mcc = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>self.risky)
        self._bind_index(&S.account_index, self.account_slots, <char*>S.accounts, sizeof(Account), <uint64_t>-1)
        self._bind_index(&S.hold_index, self.hold_slots, <char*>S.holds, sizeof(Hold), S.hold_rowmask)
        self._bind_index(&S.remembered_index, self.remembered_slots, <char*>S.remembered, sizeof(Remembered),
                         S.remembered_rowmask)
        self._bind_index(&S.merchant_index, self.merchant_slots, <char*>S.merchants,
                         S.merchant_width * sizeof(int64_t), <uint64_t>-1)
        self._bind_index(&S.card_index, self.card_slots, <char*>S.cards, sizeof(Card), <uint64_t>-1)
        assert len(self.holds) & (len(self.holds) - 1) == 0
        assert len(self.remembered) & (len(self.remembered) - 1) == 0

    # -- growth (with the GIL, before a batch) ---------------------------------

    cdef object _rehash(self, Index* ix, object slots, uint64_t need):
        """A slot array at most half full for ``need`` entries.

        Stop-the-world: O(entries).  Reinsertion is random access, so keys
        are read (and their new slots prefetched) a block ahead.
        """
        cdef uint64_t size = len(slots)
        if need * C.index_load_max_den <= size * C.index_load_max_num:
            return slots
        while need * C.index_load_max_den > size * C.index_load_max_num:
            size <<= 1
        new = _index_table(size)
        cdef uint64_t[::1] old_view = slots
        cdef Index nix = ix[0]
        nix.slots = <uint64_t*>cnp.PyArray_DATA(<cnp.ndarray>new)
        nix.mask = size - 1
        nix.count = 0
        cdef uint64_t i, j, v, m
        cdef uint64_t vals[64]
        cdef uint64_t keys[64]
        cdef uint64_t total = <uint64_t>old_view.shape[0]
        with nogil:
            i = 0
            while i < total:
                m = 0
                while i < total and m < 64:
                    v = old_view[i] & IX_VALUE_MASK
                    i += 1
                    if v != 0:
                        vals[m] = v
                        keys[m] = ix_key(ix, v)
                        ac_prefetch(slot_of(&nix, keys[m]))
                        m += 1
                for j in range(m):
                    ix_insert(&nix, keys[j], vals[j])
        assert nix.count == ix.count
        return new

    cdef object _grow_ring(self, object arr, uint64_t head, uint64_t tail, uint64_t need):
        """A ring with room for ``need`` rows, live rows at the same seq slots.

        The live range is at most two contiguous runs in the old ring and in
        the new one, so the move is a few slice copies, not a gather.
        """
        cdef uint64_t cap = len(arr)
        if need <= cap:
            return arr
        new_cap = _pow2_at_least(need)
        new = _table(new_cap, arr.dtype)
        seq = head
        while seq < tail:
            o = seq & (cap - 1)
            w = seq & (new_cap - 1)
            run = min(tail - seq, cap - o, new_cap - w)
            new[w : w + run] = arr[o : o + run]
            seq += run
        return new

    cdef object _grow_rows(self, object arr, uint64_t used, uint64_t need):
        if need <= <uint64_t>len(arr):
            return arr
        shape = (_pow2_at_least(need),) + arr.shape[1:]
        new = _table(shape, arr.dtype)
        new[:used] = arr[:used]
        return new

    cdef void _evict(self, bint holds, uint64_t count) noexcept nogil:
        """Forget the oldest ``count`` entries (closed holds only).

        In steady state (rings full) this runs for every request, so it is
        pipelined like deciding: the entries to evict are known in advance
        (the ring is in order), so their slots are prefetched EVICT_SLOTS
        ahead; deleting reads no rows (see slot_home).
        """
        cdef State* S = &self.S
        cdef Index* ix = &S.hold_index if holds else &S.remembered_index
        cdef uint64_t head = S.hold_head if holds else S.remembered_head
        cdef uint64_t tail = S.hold_tail if holds else S.remembered_tail
        cdef uint64_t k, seq
        count = min(count, tail - head)
        for k in range(count):
            seq = head + k
            if seq + EVICT_SLOTS < tail:
                ac_prefetch(slot_of(ix, self._ring_id(holds, seq + EVICT_SLOTS)))
            if holds:
                if S.holds[seq & S.hold_rowmask].state == HS_OPEN:
                    break
                ix_delete(ix, S.holds[seq & S.hold_rowmask].id, ring_value(seq))
                S.hold_head = seq + 1
                if S.hold_expire < S.hold_head:
                    S.hold_expire = S.hold_head
            else:
                ix_delete(ix, S.remembered[seq & S.remembered_rowmask].id, ring_value(seq))
                S.remembered_head = seq + 1

    cdef inline uint64_t _ring_id(self, bint holds, uint64_t seq) noexcept nogil:
        if holds:
            return self.S.holds[seq & self.S.hold_rowmask].id
        return self.S.remembered[seq & self.S.remembered_rowmask].id

    def reserve(self, uint64_t n):
        """Make room for n more requests: each may add one row everywhere.
        Returns the names of the tables that had to grow (usually none).

        Eviction depends only on logical counts (never on capacities), so a
        snapshot restored with other capacities decides exactly the same.
        """
        cdef State* S = &self.S
        cdef uint64_t live
        if S.account_count + n > C.account_rows_max or S.act_high + n > C.account_rows_max:
            raise OverflowError(f"accounts: at most {C.account_rows_max} rows per shard")
        before = self.tables()
        live = S.hold_tail - S.hold_head
        if live + n > self.holds_retained_max:
            self._evict(True, live + n - self.holds_retained_max)
        live = S.remembered_tail - S.remembered_head
        if live + n > self.remembered_max:
            self._evict(False, live + n - self.remembered_max)
        self.accounts = self._grow_rows(self.accounts, S.account_count, S.account_count + n)
        self.merchants = self._grow_rows(self.merchants, S.merchant_count, S.merchant_count + n)
        self.cards = self._grow_rows(self.cards, S.card_count, S.card_count + n)
        self.act = self._grow_rows(self.act, S.act_high, S.act_high + n)
        self.holds = self._grow_ring(self.holds, S.hold_head, S.hold_tail, S.hold_tail - S.hold_head + n)
        self.remembered = self._grow_ring(self.remembered, S.remembered_head, S.remembered_tail,
                                          S.remembered_tail - S.remembered_head + n)
        self._bind()
        self.account_slots = self._rehash(&S.account_index, self.account_slots, S.account_index.count + n)
        self.hold_slots = self._rehash(&S.hold_index, self.hold_slots, S.hold_index.count + n)
        self.remembered_slots = self._rehash(&S.remembered_index, self.remembered_slots,
                                             S.remembered_index.count + n)
        self.merchant_slots = self._rehash(&S.merchant_index, self.merchant_slots, S.merchant_index.count + n)
        self.card_slots = self._rehash(&S.card_index, self.card_slots, S.card_index.count + n)
        self._bind()
        return [name for name, t in self.tables().items() if before[name] is not t]

    def tables(self):
        """Every table at full capacity (used or not), by name."""
        return {"accounts": self.accounts, "holds": self.holds, "remembered": self.remembered,
                "merchants": self.merchants, "cards": self.cards, "activity": self.act,
                "account_slots": self.account_slots, "hold_slots": self.hold_slots,
                "remembered_slots": self.remembered_slots, "merchant_slots": self.merchant_slots,
                "card_slots": self.card_slots}

    def grow_memories(self, uint64_t n):
        """Make room in the id and hold rings (and their indexes) for ``n``
        more entries, up to their bounds, in one step.  Evicts nothing, so
        answers cannot change: replay calls it with the log's request count
        instead of doubling (copy + rehash) its way up batch by batch."""
        cdef State* S = &self.S
        need_h = min(S.hold_tail - S.hold_head + n, self.holds_retained_max)
        need_r = min(S.remembered_tail - S.remembered_head + n, self.remembered_max)
        self.holds = self._grow_ring(self.holds, S.hold_head, S.hold_tail, need_h)
        self.remembered = self._grow_ring(self.remembered, S.remembered_head, S.remembered_tail, need_r)
        self._bind()
        self.hold_slots = self._rehash(&S.hold_index, self.hold_slots, need_h)
        self.remembered_slots = self._rehash(&S.remembered_index, self.remembered_slots, need_r)
        self._bind()

    def prefault(self):
        """Touch every page of every table now, keeping contents, so that
        deciding never pays first-touch page faults (a 2 MiB huge-page fault
        costs milliseconds on this VM).  Not ``a[::4096] = a[::4096]``:
        numpy skips a copy onto itself, so that touched nothing."""
        cdef cnp.ndarray a
        cdef State* S = &self.S
        cdef size_t nbytes
        # Row tables fill from the front: touch the used rows and the next
        # PREFAULT_ROWS_AHEAD, not a presized capacity that may never be used
        # (100M accounts round up to 2^27 rows: 17 GB each for the accounts
        # and their fraud rings).  Rings and indexes are used all over.
        used = {"accounts": S.account_count, "activity": S.act_high, "merchants": S.merchant_count,
                "cards": S.card_count}
        spans = []
        for name, arr in self.tables().items():
            a = arr
            assert a.flags.c_contiguous
            nbytes = <size_t>cnp.PyArray_NBYTES(a)
            if name in used:
                nbytes = min(nbytes, <size_t>(used[name] + PREFAULT_ROWS_AHEAD) * <size_t>(a.strides[0]))
            spans.append(a.reshape(-1).view(np.uint8)[:nbytes])
        # Two threads (fresh memory faults in ~2x faster on two cores here),
        # each taking every other table, largest first; MADV_POPULATE_WRITE
        # where the kernel has it, else a write of each page's own byte.
        spans.sort(key=len, reverse=True)
        halves = [spans[0::2], spans[1::2]]
        helper = threading.Thread(target=_touch_all, args=(halves[1],), name="authcore-prefault", daemon=True)
        helper.start()
        _touch_all(halves[0])
        helper.join()

    # -- deciding ------------------------------------------------------------

    def decide(self, requests, int64_t stamp0):
        """Decide a batch stamped stamp0, stamp0+1, ...; returns the answers."""
        if not isinstance(requests, np.ndarray) or requests.dtype != C.REQUEST_DTYPE:
            raise TypeError("requests: expected a numpy array of REQUEST_DTYPE")
        if requests.ndim != 1:
            raise ValueError(f"requests: expected 1-d, got shape {requests.shape}")
        if stamp0 < 1:
            raise ValueError("stamp0: must be >= 1")
        cdef Py_ssize_t n = requests.shape[0]
        reqs = np.ascontiguousarray(requests)
        answers = np.zeros(n, C.ANSWER_DTYPE)
        if n == 0:
            return answers
        self.reserve(n)
        cdef Request* rp = <Request*>cnp.PyArray_DATA(<cnp.ndarray>reqs)
        cdef Answer* ap = <Answer*>cnp.PyArray_DATA(<cnp.ndarray>answers)
        with nogil:
            decide_batch(&self.S, rp, ap, n, stamp0)
        if AUTHCORE_VERIFY:
            self.verify()
        return answers

    # -- introspection, snapshots, digest ---------------------------------

    def card_account(self, bytes pan_hash):
        """Account id bound to this PAN hash, or None."""
        assert len(pan_hash) == 32
        cdef const uint8_t* p = pan_hash
        cdef Card* c = card_find(&self.S, p)
        return None if c == NULL else c.account

    def _hold_rows(self, copy=True):
        return _ring_rows(_ring_runs(self.holds, self.S.hold_head, self.S.hold_tail), copy)

    def _remembered_rows(self, copy=True):
        return _ring_rows(_ring_runs(self.remembered, self.S.remembered_head, self.S.remembered_tail), copy)

    def counters(self):
        cdef State* S = &self.S
        return {
            "account_count": S.account_count,
            "hold_head": S.hold_head,
            "hold_tail": S.hold_tail,
            "hold_expire": S.hold_expire,
            "remembered_head": S.remembered_head,
            "remembered_tail": S.remembered_tail,
            "merchant_count": S.merchant_count,
            "merchant_hand": S.merchant_hand,
            "card_count": S.card_count,
            "act_high": S.act_high,
            "act_hand": S.act_hand,
        }

    def export_state(self):
        """Logical state in canonical order: (arrays, counters).

        Rings come out oldest first; index slot arrays are not part of the
        state (they are rebuilt), so capacities never leak into digests.
        """
        cdef State* S = &self.S
        arrays = {
            "accounts": self.accounts[: S.account_count].copy(),
            "holds": self._hold_rows(),
            "remembered": self._remembered_rows(),
            "merchants": self.merchants[: S.merchant_count].copy(),
            "cards": self.cards[: S.card_count].copy(),
            "activity": self.act[: S.act_high].copy(),
            "settlement": self.settlement.copy(),
        }
        return arrays, self.counters()

    def state_views(self, ring_runs=False):
        """Like export_state but without copies where the layout allows
        (read-only use, e.g. digest).  ``ring_runs``: each ring as the list
        of its runs in order (at most two views), so nothing is copied."""
        cdef State* S = &self.S
        if ring_runs:
            holds = _ring_runs(self.holds, S.hold_head, S.hold_tail)
            remembered = _ring_runs(self.remembered, S.remembered_head, S.remembered_tail)
        else:
            holds, remembered = self._hold_rows(copy=False), self._remembered_rows(copy=False)
        return {
            "accounts": self.accounts[: S.account_count],
            "holds": holds,
            "remembered": remembered,
            "merchants": self.merchants[: S.merchant_count],
            "cards": self.cards[: S.card_count],
            "activity": self.act[: S.act_high],
            "settlement": self.settlement,
        }, self.counters()

    def stage_import(self, dict specs, dict counters):
        """Fresh tables for a state whose arrays have ``specs`` (name ->
        (dtype, shape)), and where each array's bytes belong in them:
        ``(tables, {name: [uint8 views, in the array's byte order]})``.

        A snapshot reader fills the views straight from disk, so each page
        of the new tables is touched once (at 10M accounts, a read into
        temporary arrays and a copy into fresh tables spent most of the
        recovery zeroing pages twice).  Nothing of the kernel changes until
        install_import: a snapshot that fails its checksum halfway leaves
        the kernel as it was.
        """
        expect = {"accounts": ACCOUNT_DTYPE, "holds": HOLD_DTYPE, "remembered": REMEMBERED_DTYPE,
                  "merchants": np.dtype(np.int64), "cards": CARD_DTYPE, "activity": np.dtype(np.int64),
                  "settlement": np.dtype(np.int64)}
        if set(specs) != set(expect):
            raise ValueError(f"snapshot arrays {sorted(specs)}; expected {sorted(expect)}")
        for name, (dtype, shape) in specs.items():
            ndim = 2 if name in ("merchants", "activity") else 1
            if np.dtype(dtype) != expect[name] or len(shape) != ndim:
                raise ValueError(f"snapshot array {name} has an unexpected layout")
        if specs["settlement"][1] != (C.currency_max + 1,):
            raise ValueError("snapshot array settlement has an unexpected length")
        missing = IMPORT_COUNTERS - set(counters)
        if missing:
            raise ValueError(f"snapshot counters lack {sorted(missing)}")
        n_holds = specs["holds"][1][0]
        n_rem = specs["remembered"][1][0]
        if counters["hold_tail"] - counters["hold_head"] != n_holds \
                or counters["remembered_tail"] - counters["remembered_head"] != n_rem \
                or counters["act_high"] != specs["activity"][1][0] \
                or counters["account_count"] != specs["accounts"][1][0] \
                or counters["merchant_count"] != specs["merchants"][1][0] \
                or counters["card_count"] != specs["cards"][1][0]:
            raise ValueError("snapshot counters disagree with its arrays")
        sizes = self.initial
        n_acc = specs["accounts"][1][0]
        n_mer, mer_w = specs["merchants"][1]
        n_act, act_w = specs["activity"][1]
        n_cards = specs["cards"][1][0]
        tables = {
            "accounts": _table(_pow2_at_least(max(n_acc, sizes.get("accounts", 0))), ACCOUNT_DTYPE),
            "merchants": _table((_pow2_at_least(n_mer), mer_w), np.int64),
            "cards": _table(_pow2_at_least(n_cards), CARD_DTYPE),
            "activity": _table((_pow2_at_least(max(n_act, sizes.get("accounts", 0))), act_w), np.int64),
            "settlement": np.zeros(C.currency_max + 1, np.int64),
            "holds": _table(_pow2_at_least(max(n_holds, sizes.get("holds", 0))), HOLD_DTYPE),
            "remembered": _table(_pow2_at_least(max(n_rem, sizes.get("ids", 0))), REMEMBERED_DTYPE),
        }
        # Index slots: twice the entries (load <= 1/2), filled at install.
        tables["account_slots"] = _index_table(_pow2_at_least(2 * max(n_acc + 1, sizes.get("accounts", 0))))
        tables["hold_slots"] = _index_table(_pow2_at_least(2 * max(n_holds + 1, sizes.get("holds", 0))))
        tables["remembered_slots"] = _index_table(_pow2_at_least(2 * max(n_rem + 1, sizes.get("ids", 0))))
        tables["merchant_slots"] = _index_table(_pow2_at_least(2 * n_mer + 2))
        tables["card_slots"] = _index_table(_pow2_at_least(2 * n_cards + 2))
        dests = {  # export_state's order, which is the snapshot's
            "accounts": [_bytes(tables["accounts"][:n_acc])],
            "holds": _ring_pieces(tables["holds"], counters["hold_head"], counters["hold_tail"]),
            "remembered": _ring_pieces(tables["remembered"], counters["remembered_head"],
                                       counters["remembered_tail"]),
            "merchants": [_bytes(tables["merchants"][:n_mer])],
            "cards": [_bytes(tables["cards"][:n_cards])],
            "activity": [_bytes(tables["activity"][:n_act])],
            "settlement": [_bytes(tables["settlement"])],
        }
        return tables, dests

    def install_import(self, dict tables, dict counters):
        """Make staged tables (stage_import, filled) the kernel's state.
        Checks come first: if it raises, nothing changed."""
        cdef State* S = &self.S
        if tables["merchants"].shape[1] != S.merchant_width or tables["activity"].shape[1] != S.act_width:
            raise ValueError("snapshot ring widths differ from the configured fraud rules")
        missing = IMPORT_COUNTERS - set(counters)
        if missing:
            raise ValueError(f"snapshot counters lack {sorted(missing)}")
        self.accounts = tables["accounts"]
        self.merchants = tables["merchants"]
        self.cards = tables["cards"]
        self.act = tables["activity"]
        self.settlement = tables["settlement"]
        self.holds = tables["holds"]
        self.remembered = tables["remembered"]
        self.account_slots = tables["account_slots"]
        self.hold_slots = tables["hold_slots"]
        self.remembered_slots = tables["remembered_slots"]
        self.merchant_slots = tables["merchant_slots"]
        self.card_slots = tables["card_slots"]
        S.account_count = counters["account_count"]
        S.merchant_count = counters["merchant_count"]
        S.card_count = counters["card_count"]
        S.act_high = counters["act_high"]
        S.act_hand = counters["act_hand"]
        S.merchant_hand = counters.get("merchant_hand", 0)
        S.hold_head = counters["hold_head"]
        S.hold_tail = counters["hold_tail"]
        S.hold_expire = counters["hold_expire"]
        S.remembered_head = counters["remembered_head"]
        S.remembered_tail = counters["remembered_tail"]
        self._rebuild_indexes()

    def _rebuild_indexes(self):
        """Fill the (empty, presized) index slot tables from the rows."""
        cdef State* S = &self.S
        self._bind()
        cdef uint64_t i
        S.account_index.count = 0
        S.hold_index.count = 0
        S.remembered_index.count = 0
        S.merchant_index.count = 0
        S.card_index.count = 0
        # Keys come in row order, slots at random: prefetch the slot of the
        # key REBUILD_AHEAD rows on (a snapshot of 10M accounts and 20M ids
        # is 30M inserts, each otherwise a serial cache miss).
        with nogil:
            for i in range(S.account_count):
                if i + REBUILD_AHEAD < S.account_count:
                    ac_prefetch(slot_of(&S.account_index, S.accounts[i + REBUILD_AHEAD].id))
                ix_insert(&S.account_index, S.accounts[i].id, i + 1)
            for i in range(S.hold_head, S.hold_tail):
                if i + REBUILD_AHEAD < S.hold_tail:
                    ac_prefetch(slot_of(&S.hold_index, S.holds[(i + REBUILD_AHEAD) & S.hold_rowmask].id))
                ix_insert(&S.hold_index, S.holds[i & S.hold_rowmask].id, ring_value(i))
            for i in range(S.remembered_head, S.remembered_tail):
                if i + REBUILD_AHEAD < S.remembered_tail:
                    ac_prefetch(slot_of(&S.remembered_index,
                                        S.remembered[(i + REBUILD_AHEAD) & S.remembered_rowmask].id))
                ix_insert(&S.remembered_index, S.remembered[i & S.remembered_rowmask].id, ring_value(i))
            for i in range(S.merchant_count):
                ix_insert(&S.merchant_index, <uint64_t>S.merchants[i * S.merchant_width], i + 1)
            for i in range(S.card_count):
                ix_insert(&S.card_index, S.cards[i].key, i + 1)

    def verify(self):
        """O(n) consistency checks (debug builds run them after each batch)."""
        cdef State* S = &self.S
        acc = self.accounts[: S.account_count]
        holds = self._hold_rows()
        open_ = holds[holds["state"] == HS_OPEN]
        held = np.zeros(S.account_count, np.int64)
        np.add.at(held, open_["account"].astype(np.int64), open_["remaining"])
        assert (held == acc["held"]).all(), "held != sum of open holds"
        for cur in np.unique(acc["currency"]):
            total = int(acc["balance"][acc["currency"] == cur].astype(object).sum()) + int(self.settlement[cur])
            assert total == 0, f"balances of currency {cur} sum to {total}"
        assert S.account_index.count == S.account_count
        assert S.hold_index.count == S.hold_tail - S.hold_head
        assert S.remembered_index.count == S.remembered_tail - S.remembered_head
        cdef Index* ixs[4]
        ixs[0], ixs[1], ixs[2], ixs[3] = &S.account_index, &S.hold_index, &S.remembered_index, &S.merchant_index
        for k, name in enumerate(("account", "hold", "remembered", "merchant")):
            bad = _index_errors(ixs[k])
            assert bad == 0, f"{name} index: {bad} slots off their key's probe chain or with a wrong tag"
        return True
