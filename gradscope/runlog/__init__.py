"""The run log: an append-only JSON-lines file written while training runs, and its reader.

Every line is one JSON object with a "type":

- ``header``: schema version, the model layout, the watch options, the record fields;
- ``step``: one recorded step (every StepRecord field);
- ``loss``: the losses of steps that were not recorded;
- ``diagnosis``: a diagnosis that is new or changed at a step;
- ``end``: written by ``close()``; its absence means the run stopped early.

Each line goes to the file in one ``os.write`` call, so a run that is killed leaves a log
that reads back up to its last complete line. Non-finite numbers are stored as the strings
"nan", "inf" and "-inf" (NaN inside per-parameter arrays as null); per-parameter float arrays
keep float32 precision, which is what the on-device statistics have.
"""

from .encoding import LOG_NAME, SCHEMA, decode_record, encode_record, jsonable
from .reader import LogProblem, RunLog, find_log, layout_from_summary, read_log
from .writer import RunLogWriter

__all__ = [
    "LOG_NAME",
    "SCHEMA",
    "LogProblem",
    "RunLog",
    "RunLogWriter",
    "decode_record",
    "encode_record",
    "find_log",
    "jsonable",
    "layout_from_summary",
    "read_log",
]
