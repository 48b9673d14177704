#!/usr/bin/env python3
"""Generate the KPL test vectors committed under kcl-kpl/tests/vectors/.

Install (the aggregator imports `six` without declaring it):

    pip install aws-kinesis-agg six protobuf

Run from anywhere:

    python3 scripts/gen_vectors.py            # rewrites kcl-kpl/tests/vectors/
    python3 scripts/gen_vectors.py --check    # regenerates in memory, fails if files differ

Every `*.bin` is the raw Data blob of one Kinesis record. `manifest.json` says, per file, what
a deaggregator must produce (the format of ../shared/kpl-vectors/manifest.json, plus a few
fields):

* `expected_count` and `expected_records_md5`: the number of user records and the MD5 (hex) of
  one line per record, `SUB\\tPK_HEX\\tEHK\\tEFFECTIVE\\tDATA_HEX\\n` (PK_HEX, DATA_HEX: lowercase
  hex of the UTF-8 key / the data; EHK: the explicit hash key, or `-` when unset; EFFECTIVE:
  the effective hash key in decimal);
* `expected_records`: the same records spelled out (only for vectors of at most 20 records and
  4 KiB of data, to keep the manifest small);
* `hash_range_cases`: a shard range and the sub-sequence numbers kept under the Java KCL rule
  (any user record outside the range drops the whole aggregate);
* `canonical`: true when the file is exactly what `aws-kinesis-agg` wrote for these user
  records (an aggregator adding the same records in order must produce the same bytes);
* for pass-throughs, `expected_records` is the string `PASS_THROUGH ...` and `pass_through`
  gives `kind` (`not_aggregated` or `invalid_aggregate`) and `reason`.

How the expected results are computed, independently of any deaggregator:

* valid vectors: the expected records ARE the user records this script fed to the official
  aggregator `aws_kinesis_agg.aggregator.AggRecord` (sub-sequence = position of the add), and
  the effective hash key is the explicit hash key, else `int.from_bytes(md5(pk_utf8), "big")`;
* malformed vectors: the script breaks one thing on purpose and the expectation says what it
  broke (pass-through, with that reason).
Both are then cross-checked against `classify()`, a reading of each blob with hashlib and the
protobuf classes shipped by aws-kinesis-agg (ParseFromString + IsInitialized + table checks);
the script stops if the two disagree.
"""

import argparse
import base64
import hashlib
import json
import os
import random
import re
import sys

try:
    import aws_kinesis_agg
    import aws_kinesis_agg.aggregator as agg  # puts the package dir on sys.path for messages_pb2
    from aws_kinesis_agg import messages_pb2
    import google.protobuf
except ImportError as e:  # pragma: no cover
    sys.exit(f"{e}: run `pip install aws-kinesis-agg six protobuf`")

SEED = 20250101
MAGIC = aws_kinesis_agg.MAGIC
MAX_HASH_KEY = 2**128 - 1
MAX_RECORD = 1024 * 1024
EXPLICIT_LIST_LIMIT = 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "kcl-kpl", "tests", "vectors")


def effective_hash_key(pk, ehk):
    if ehk is not None:
        return int(ehk)
    return int.from_bytes(hashlib.md5(pk.encode("utf-8")).digest(), "big")


def seal(body):
    """Magic + protobuf + MD5 of the protobuf."""
    return MAGIC + body + hashlib.md5(body).digest()


def body_of(blob):
    return blob[len(MAGIC) : -16]


def aggregate(records):
    """Aggregates [(pk, ehk or None, data)] with the official library. Returns (blob, pk, ehk)."""
    rec = agg.AggRecord()
    for pk, ehk, data in records:
        if not rec.add_user_record(pk, data, ehk):
            raise SystemExit(f"record {pk!r} does not fit in one aggregate")
    pk, ehk, blob = rec.get_contents()
    return blob, pk, ehk


def varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_len(num, payload):
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def field_varint(num, value):
    return varint(num << 3) + varint(value)


# ---------------------------------------------------------------------------------------------
# Independent classification with hashlib + the protobuf classes.


def classify(blob):
    """Returns ("aggregated", [(sub, pk, ehk, data)]) or (kind, reason) for a pass-through."""
    if not blob.startswith(MAGIC):
        return "not_aggregated", "no_magic"
    if len(blob) <= len(MAGIC) + 16:
        return "not_aggregated", "too_short"
    body = body_of(blob)
    if hashlib.md5(body).digest() != blob[-16:]:
        return "not_aggregated", "digest_mismatch"
    msg = messages_pb2.AggregatedRecord()
    try:
        msg.ParseFromString(body)
    except Exception:
        return "invalid_aggregate", "malformed_protobuf"
    if not msg.IsInitialized():
        return "invalid_aggregate", "missing_required_field"
    pks = list(msg.partition_key_table)
    ehks = list(msg.explicit_hash_key_table)
    # upb hands back bytes (not str) for proto2 strings that are not UTF-8.
    if any(not isinstance(k, str) for k in pks + ehks):
        return "invalid_aggregate", "non_utf8_key"
    for e in ehks:
        if not re.fullmatch(r"[0-9]+", e) or int(e) > MAX_HASH_KEY:
            return "invalid_aggregate", "malformed_explicit_hash_key"
    if len(msg.records) == 0:
        return "invalid_aggregate", "no_records"
    out = []
    for i, r in enumerate(msg.records):
        if r.partition_key_index >= len(pks):
            return "invalid_aggregate", "partition_key_index_out_of_range"
        ehk = None
        if r.HasField("explicit_hash_key_index"):
            if r.explicit_hash_key_index >= len(ehks):
                return "invalid_aggregate", "explicit_hash_key_index_out_of_range"
            ehk = ehks[r.explicit_hash_key_index]
        out.append((i, pks[r.partition_key_index], ehk, bytes(r.data)))
    return "aggregated", out


# ---------------------------------------------------------------------------------------------
# Vectors.


class Vectors:
    def __init__(self):
        self.files = {}
        self.entries = []

    def _base(self, name, description, blob):
        self.files[name] = blob
        return {
            "file": name,
            "description": description,
            "source": "scripts/gen_vectors.py",
            "size_bytes": len(blob),
            "md5_of_file": hashlib.md5(blob).hexdigest(),
        }

    def valid(self, name, description, records, blob=None, outer=(None, None), canonical=None,
              ranges=()):
        """records: [(pk, ehk, data)] as fed to the aggregator (the expected output)."""
        if blob is None:
            blob, opk, oehk = aggregate(records)
            outer = (opk, oehk)
            canonical = True if canonical is None else canonical
        entry = self._base(name, description, blob)
        expected = [(i, pk, ehk, data) for i, (pk, ehk, data) in enumerate(records)]
        got = classify(blob)
        if got != ("aggregated", expected):
            raise SystemExit(f"{name}: classify() disagrees with the records fed in: {got!r:.300}")
        lines = "".join(
            f"{i}\t{pk.encode('utf-8').hex()}\t{ehk if ehk is not None else '-'}\t"
            f"{effective_hash_key(pk, ehk)}\t{data.hex()}\n"
            for i, pk, ehk, data in expected
        )
        entry.update(
            {
                "outer_partition_key": outer[0],
                "outer_explicit_hash_key": outer[1],
                "is_aggregated": True,
                "canonical": bool(canonical),
                "expected_count": len(expected),
                "expected_records_md5": hashlib.md5(lines.encode("ascii")).hexdigest(),
            }
        )
        if len(expected) <= EXPLICIT_LIST_LIMIT and sum(len(r[3]) for r in expected) <= 4096:
            entry["expected_records"] = [
                {
                    "sub_sequence_number": i,
                    "partition_key": pk,
                    "explicit_hash_key": ehk,
                    "effective_hash_key": str(effective_hash_key(pk, ehk)),
                    "data_b64": base64.b64encode(data).decode("ascii"),
                }
                for i, pk, ehk, data in expected
            ]
        cases = []
        keys = [effective_hash_key(pk, ehk) for _, pk, ehk, _ in expected]
        for start, end, note in ranges:
            kept = all(start <= k <= end for k in keys)
            cases.append(
                {
                    "starting_hash_key": str(start),
                    "ending_hash_key": str(end),
                    "note": note,
                    "expected_sub_sequence_numbers": list(range(len(keys))) if kept else [],
                }
            )
        if cases:
            entry["hash_range_cases"] = cases
        self.entries.append(entry)

    def pass_through(self, name, description, blob, kind, reason):
        got = classify(blob)
        if got != (kind, reason):
            raise SystemExit(f"{name}: expected {kind}/{reason}, classify() says {got!r:.300}")
        entry = self._base(name, description, blob)
        entry.update(
            {
                "outer_partition_key": None,
                "outer_explicit_hash_key": None,
                "is_aggregated": False,
                "expected_records": "PASS_THROUGH (emit the original Kinesis record unchanged, "
                "sub_sequence_number 0, aggregated=false)",
                "pass_through": {"kind": kind, "reason": reason},
            }
        )
        self.entries.append(entry)


def build():
    rng = random.Random(SEED)
    v = Vectors()
    full = (0, MAX_HASH_KEY, "full range: all kept")
    low = (0, 2**127 - 1, "lower half")
    high = (2**127, MAX_HASH_KEY, "upper half")
    inner = (1, MAX_HASH_KEY - 1, "all but the two end keys")

    # --- valid aggregates -----------------------------------------------------------------
    v.valid("single.bin", "1 record, no explicit hash key", [("alpha", None, b"hello")],
            ranges=[full, low, high])
    v.valid("single_ehk.bin", "1 record with an explicit hash key",
            [("alpha", "12345678901234567890", b"hello")],
            ranges=[full, (12345678901234567890, 12345678901234567890, "single point: kept"),
                    (12345678901234567891, MAX_HASH_KEY, "just above: dropped")])
    mixed = [
        ("p-0", None, b"zero"),
        ("p-1", "100", b"one"),
        ("p-0", "200", b"two"),
        ("p-2", None, b"three"),
        ("p-1", "100", b"four"),
        ("p-3", "300", b"five"),
    ]
    v.valid("mixed_ehk.bin", "6 records, some with explicit hash keys, keys shared", mixed,
            ranges=[full, (0, 300, "explicit keys in range, md5 keys not: dropped")])
    shared = [
        (f"shared-{i % 3}", ("7" if i % 4 == 0 else "8") if i % 2 == 0 else None,
         f"payload {i}".encode())
        for i in range(20)
    ]
    v.valid("shared_keys.bin", "20 records over 3 partition keys and 2 explicit hash keys",
            shared, ranges=[full])
    v.valid("binary_and_empty.bin", "binary data (all 256 byte values), empty data, NUL bytes",
            [("bin", None, bytes(range(256))), ("empty", None, b""), ("nul", None, b"\0" * 5),
             ("empty", None, b"")], ranges=[full])
    unicode_keys = ["ключ", "鍵", "🔑 key", "e\u0301", "\u00e9", "ü" * 256, "tab\tand\nnewline"]
    v.valid("unicode_keys.bin", "Unicode partition keys (Cyrillic, CJK, emoji, combining, "
            "256 characters, control characters)",
            [(k, None, k.encode("utf-8")) for k in unicode_keys], ranges=[full])
    many = []
    for i in range(1000):
        ehk = str(rng.randrange(2**128)) if i % 10 == 0 else None
        many.append((f"user-{i % 50}", ehk, f"event {i} {rng.randrange(10**9)}".encode()))
    v.valid("many_small.bin", "1000 small records, 50 shared partition keys, some explicit "
            "hash keys", many, ranges=[full])

    # One user record making the aggregate, plus its partition key, exactly 1 MiB.
    pk = "big"
    size = MAX_RECORD - 64
    while True:
        data = rng.randbytes(size)
        blob, _, _ = aggregate([(pk, None, data)])
        if len(blob) + len(pk) >= MAX_RECORD:
            break
        size += MAX_RECORD - len(blob) - len(pk)
    if len(blob) + len(pk) != MAX_RECORD:
        raise SystemExit("could not hit exactly 1 MiB")
    v.valid("near_1mib.bin", "1 user record; aggregate + partition key = exactly 1 MiB",
            [(pk, None, data)], ranges=[full])

    b = [str(0), str(2**127 - 1), str(2**127), str(MAX_HASH_KEY)]
    v.valid("ehk_lower_half.bin", "explicit hash keys 0 and 2^127-1",
            [("lo", b[0], b"at 0"), ("lo", b[1], b"at 2^127-1")],
            ranges=[full, low, high, inner])
    v.valid("ehk_upper_half.bin", "explicit hash keys 2^127 and 2^128-1",
            [("hi", b[2], b"at 2^127"), ("hi", b[3], b"at 2^128-1")],
            ranges=[full, low, high, inner])
    v.valid("ehk_boundaries.bin", "explicit hash keys 0, 2^127-1, 2^127, 2^128-1",
            [("edge", k, k.encode()) for k in b], ranges=[full, low, high, inner])

    # Tags: aggregate officially, then add tags with the library's classes and reseal.
    tagged = [("t-0", None, b"tagged"), ("t-1", "42", b"tagged too"), ("t-0", None, b"none")]
    blob, opk, oehk = aggregate(tagged)
    msg = messages_pb2.AggregatedRecord()
    msg.ParseFromString(body_of(blob))
    t = msg.records[0].tags.add()
    t.key, t.value = "k1", "v1"
    msg.records[0].tags.add().key = "key only"
    t = msg.records[1].tags.add()
    t.key, t.value = "ключ", "значение"
    v.valid("tags.bin", "records carrying tags (ignored)", tagged,
            blob=seal(msg.SerializeToString()), outer=(opk, oehk), canonical=False)

    # Unknown fields (skipped) and tables written after the records (any order is valid).
    plain = [("u-0", None, b"a"), ("u-1", "9", b"b")]
    blob, opk, oehk = aggregate(plain)
    body = body_of(blob)
    msg.ParseFromString(body)
    records_part = b"".join(field_len(3, r.SerializeToString() + field_varint(15, 7))
                            for r in msg.records)
    tables = field_len(1, b"u-0") + field_len(1, b"u-1") + field_len(2, b"9")
    unknown = field_varint(9, 300) + field_len(10, b"future") + bytes([0x5D, 1, 2, 3, 4])
    v.valid("unknown_fields_reordered.bin",
            "records before the key tables, unknown fields at both levels", plain,
            blob=seal(records_part + unknown + tables), outer=(opk, oehk), canonical=False)

    # Known field numbers with an unexpected wire type: skipped as unknown fields, as the
    # C++, Java and Python protobuf runtimes do.
    record = (field_varint(1, 0) + bytes([0x1D, 1, 2, 3, 4]) + field_len(3, b"kept")
              + field_len(2, b"idx as bytes"))
    v.valid("wrong_wire_types_skipped.bin",
            "known field numbers with unexpected wire types (skipped as unknown)",
            [("w", None, b"kept")],
            blob=seal(field_len(1, b"w") + field_varint(2, 5) + bytes([0x1D, 0, 0, 0, 0])
                      + field_len(3, record)),
            canonical=False)

    # --- not aggregated -------------------------------------------------------------------
    v.pass_through("plain_text.bin", "plain payload", b"just a plain record\n",
                   "not_aggregated", "no_magic")
    v.pass_through("empty.bin", "empty payload", b"", "not_aggregated", "no_magic")
    v.pass_through("magic_prefix_3.bin", "first three magic bytes only", MAGIC[:3],
                   "not_aggregated", "no_magic")
    v.pass_through("magic_only.bin", "only the 4 magic bytes", MAGIC, "not_aggregated",
                   "too_short")
    v.pass_through("magic_plus_16.bin", "magic plus exactly 16 random bytes",
                   MAGIC + rng.randbytes(16), "not_aggregated", "too_short")
    v.pass_through("magic_plus_md5_of_empty.bin",
                   "magic plus the MD5 of an empty protobuf: an empty body is not an aggregate",
                   seal(b""), "not_aggregated", "too_short")
    good, _, _ = aggregate(mixed)
    bad = bytearray(good)
    bad[-1] ^= 0x01
    v.pass_through("bad_md5.bin", "mixed_ehk.bin with the last digest byte flipped",
                   bytes(bad), "not_aggregated", "digest_mismatch")
    bad = bytearray(good)
    bad[10] ^= 0x20
    v.pass_through("body_flipped.bin", "mixed_ehk.bin with a protobuf byte flipped, digest "
                   "kept", bytes(bad), "not_aggregated", "digest_mismatch")

    # --- invalid aggregates (digest right, protobuf wrong) --------------------------------
    def resealed(name, description, body, reason):
        v.pass_through(name, description, seal(body), "invalid_aggregate", reason)

    resealed("truncated_protobuf.bin", "mixed_ehk.bin's protobuf cut inside the last record, "
             "digest recomputed", body_of(good)[:-3], "malformed_protobuf")
    resealed("bad_varint.bin", "an 11-byte varint", field_len(1, b"k") + bytes([0x08])
             + bytes([0xFF] * 10) + bytes([0x01]), "malformed_protobuf")

    def partial(fill):
        m = messages_pb2.AggregatedRecord()
        fill(m)
        return m.SerializePartialToString()

    def no_data(m):
        m.partition_key_table.append("k")
        m.records.add().partition_key_index = 0

    def no_pk_index(m):
        m.partition_key_table.append("k")
        m.records.add().data = b"x"

    def tag_without_key(m):
        m.partition_key_table.append("k")
        r = m.records.add()
        r.partition_key_index, r.data = 0, b"x"
        r.tags.add().value = "value without key"

    def second_bad_pk(m):
        m.partition_key_table.append("k")
        r = m.records.add()
        r.partition_key_index, r.data = 0, b"good"
        r = m.records.add()
        r.partition_key_index, r.data = 1, b"bad index"
        r = m.records.add()
        r.partition_key_index, r.data = 0, b"good again"

    def bad_ehk_index(m):
        m.partition_key_table.append("k")
        m.explicit_hash_key_table.append("5")
        r = m.records.add()
        r.partition_key_index, r.explicit_hash_key_index, r.data = 0, 1, b"x"

    def ehk_value(value):
        def fill(m):
            m.partition_key_table.append("k")
            m.explicit_hash_key_table.append(value)
            r = m.records.add()
            r.partition_key_index, r.explicit_hash_key_index, r.data = 0, 0, b"x"
        return fill

    def unused_bad_ehk(m):
        m.partition_key_table.append("k")
        m.explicit_hash_key_table.append("not a number")
        r = m.records.add()
        r.partition_key_index, r.data = 0, b"x"

    def tables_only(m):
        m.partition_key_table.append("k")
        m.explicit_hash_key_table.append("1")

    resealed("missing_data.bin", "a record without its required data field",
             partial(no_data), "missing_required_field")
    resealed("missing_partition_key_index.bin", "a record without its required "
             "partition_key_index", partial(no_pk_index), "missing_required_field")
    resealed("tag_without_key.bin", "a tag without its required key",
             partial(tag_without_key), "missing_required_field")
    resealed("pk_index_out_of_range.bin", "3 records; the second's partition key index is past "
             "the table (never a partial aggregate)", partial(second_bad_pk),
             "partition_key_index_out_of_range")
    resealed("ehk_index_out_of_range.bin", "explicit hash key index past the table",
             partial(bad_ehk_index), "explicit_hash_key_index_out_of_range")
    resealed("ehk_not_a_number.bin", "explicit hash key '12abc'", partial(ehk_value("12abc")),
             "malformed_explicit_hash_key")
    resealed("ehk_too_large.bin", "explicit hash key 2^128", partial(ehk_value(str(2**128))),
             "malformed_explicit_hash_key")
    resealed("ehk_negative.bin", "explicit hash key -1", partial(ehk_value("-1")),
             "malformed_explicit_hash_key")
    resealed("ehk_unused_malformed.bin", "a malformed explicit hash key no record uses",
             partial(unused_bad_ehk), "malformed_explicit_hash_key")
    resealed("non_utf8_partition_key.bin", "partition key table entry FF FE",
             field_len(1, b"\xff\xfe") + field_len(3, field_varint(1, 0) + field_len(3, b"x")),
             "non_utf8_key")
    resealed("no_records.bin", "key tables but no record", partial(tables_only), "no_records")

    manifest = {
        "generator": {
            "library": "aws-kinesis-agg (PyPI)",
            "version": getattr(aws_kinesis_agg, "__version__", None) or _dist_version(),
            "protobuf": google.protobuf.__version__,
            "python": sys.version.split()[0],
            "script": "scripts/gen_vectors.py",
            "seed": SEED,
        },
        "semantics": __doc__.strip(),
        "max_hash_key": str(MAX_HASH_KEY),
        "vectors": v.entries,
    }
    return v.files, manifest


def _dist_version():
    try:
        from importlib.metadata import version

        return version("aws-kinesis-agg")
    except Exception:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="fail if the committed files differ from what would be written")
    parser.add_argument("--out", default=OUT_DIR, help="output folder")
    args = parser.parse_args()
    files, manifest = build()
    files["manifest.json"] = (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode()
    if args.check:
        stale = []
        for name, blob in sorted(files.items()):
            path = os.path.join(args.out, name)
            if not os.path.exists(path):
                stale.append(name)
            elif name == "manifest.json":
                # Tool versions may differ; everything else must not.
                old = json.load(open(path, encoding="utf-8"))
                old.pop("generator", None)
                manifest_now = dict(manifest)
                manifest_now.pop("generator", None)
                if old != manifest_now:
                    stale.append(name)
            elif open(path, "rb").read() != blob:
                stale.append(name)
        if stale:
            sys.exit(f"vectors differ from the generator: {', '.join(stale)}")
        print(f"{len(files) - 1} vectors and the manifest match")
        return
    os.makedirs(args.out, exist_ok=True)
    for name in os.listdir(args.out):
        if name.endswith(".bin") and name not in files:
            os.remove(os.path.join(args.out, name))
    for name, blob in files.items():
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(blob)
    total = sum(len(b) for b in files.values())
    print(f"wrote {len(files) - 1} vectors and manifest.json to {args.out} ({total} bytes)")


if __name__ == "__main__":
    main()
