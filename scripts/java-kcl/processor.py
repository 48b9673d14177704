#!/usr/bin/env python3
"""A record processor for the Java KCL's MultiLangDaemon, used by the interop tests.

The daemon starts one copy of this script per lease and talks to it on stdin/stdout through
`amazon_kclpy.kcl`. Every event is appended as one JSON line to the file named by
KCL_JAVA_RECORD_LOG (opened in append mode, flushed after every line, so that several
processes of one worker can share it and a SIGKILL loses nothing already written):

  {"worker": W, "shard": S, "event": "initialize", "sequence": SEQ, "subsequence": N}
  {"worker": W, "shard": S, "event": "record", "sequence": SEQ, "subsequence": N,
   "partition_key": K, "data": BASE64}
  {"worker": W, "shard": S, "event": "checkpoint", "sequence": SEQ, "subsequence": N}
  {"worker": W, "shard": S, "event": "checkpoint_error", "error": E}
  {"worker": W, "shard": S, "event": "shutdown", "reason": "lease_lost" | "shard_ended"
   | "shutdown_requested"}

KCL_JAVA_WORKER_ID names the worker in the lines. KCL_JAVA_CHECKPOINT chooses when to
checkpoint:
  - "batch" (default): after every batch, at its last record; at a shard's end; when a
    graceful shutdown is requested.
  - "subsequence:N": once, at the first record whose sub-sequence number is N (a record inside
    a KPL aggregate), and never again (not at a requested shutdown either; a shard's end is still
    checkpointed, since the daemon requires it).
"""

import json
import os
import sys

from amazon_kclpy import kcl
from amazon_kclpy.checkpoint_error import CheckpointError
from amazon_kclpy.v3 import processor


class RecordLog(object):
    def __init__(self, path, worker):
        self._file = open(path, "a", encoding="utf-8")
        self._worker = worker

    def write(self, shard, event, **fields):
        line = {"worker": self._worker, "shard": shard, "event": event}
        line.update(fields)
        self._file.write(json.dumps(line, sort_keys=True) + "\n")
        self._file.flush()


def parse_mode(text):
    if text in (None, "", "batch"):
        return None
    prefix = "subsequence:"
    if text.startswith(prefix):
        return int(text[len(prefix):])
    raise SystemExit("KCL_JAVA_CHECKPOINT must be 'batch' or 'subsequence:N', not %r" % text)


class LoggingProcessor(processor.RecordProcessorBase):
    def __init__(self, log, stop_at_subsequence):
        self._log = log
        self._shard = None
        self._stop_at = stop_at_subsequence
        self._checkpointed_once = False

    def _checkpoint(self, checkpointer, sequence=None, subsequence=None):
        try:
            checkpointer.checkpoint(sequence, subsequence)
        except CheckpointError as error:
            self._log.write(self._shard, "checkpoint_error", error=str(error))
            return
        self._log.write(self._shard, "checkpoint", sequence=sequence, subsequence=subsequence)

    def initialize(self, initialize_input):
        self._shard = initialize_input.shard_id
        self._log.write(
            self._shard,
            "initialize",
            sequence=initialize_input.sequence_number,
            subsequence=initialize_input.sub_sequence_number,
        )

    def process_records(self, process_records_input):
        last = None
        target = None
        for record in process_records_input.records:
            self._log.write(
                self._shard,
                "record",
                sequence=record.sequence_number,
                subsequence=record.sub_sequence_number,
                partition_key=record.partition_key,
                data=record.data,
            )
            last = record
            if (
                self._stop_at is not None
                and target is None
                and not self._checkpointed_once
                and record.sub_sequence_number == self._stop_at
            ):
                target = record
        checkpointer = process_records_input.checkpointer
        if self._stop_at is None:
            if last is not None:
                self._checkpoint(checkpointer, last.sequence_number, last.sub_sequence_number)
        elif target is not None:
            self._checkpointed_once = True
            self._checkpoint(checkpointer, target.sequence_number, target.sub_sequence_number)

    def lease_lost(self, lease_lost_input):
        self._log.write(self._shard, "shutdown", reason="lease_lost")

    def shard_ended(self, shard_ended_input):
        self._log.write(self._shard, "shutdown", reason="shard_ended")
        self._checkpoint(shard_ended_input.checkpointer)

    def shutdown_requested(self, shutdown_requested_input):
        self._log.write(self._shard, "shutdown", reason="shutdown_requested")
        if self._stop_at is None:
            self._checkpoint(shutdown_requested_input.checkpointer)


def main():
    path = os.environ.get("KCL_JAVA_RECORD_LOG")
    if not path:
        raise SystemExit("KCL_JAVA_RECORD_LOG is not set")
    log = RecordLog(path, os.environ.get("KCL_JAVA_WORKER_ID", "java"))
    stop_at = parse_mode(os.environ.get("KCL_JAVA_CHECKPOINT"))
    kcl.KCLProcess(LoggingProcessor(log, stop_at)).run()


if __name__ == "__main__":
    sys.exit(main())
