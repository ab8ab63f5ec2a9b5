"""Date-partitioned sources: `{date}` in a source URI, so a night lists only the days that can
have received images, not the whole history.

`s3://bucket/line3/{date}/` (or a local `/data/line3/{date}`) stands for one folder per day;
`{date}` is the day as 2026-12-03, `{date:FORMAT}` any strftime FORMAT that names a day
(`{date:%Y/%m/%d}` spans three folder levels, `day={date:%Y%m%d}` is a Hive-style level,
`{date}.parquet` a manifest per day). The source's root (partitions are counted from it, local
inputs may be read from under it) is the folder above the first templated level.

Which days a run lists (`days_to_list`), in UTC:
- after a finished run: from the day that run listed its inputs, less `lookback_days`
  (default 1: files that arrive late in yesterday's folder, plants a few hours behind UTC),
  to today;
- with no finished run: every day folder that exists (one listing with a delimiter per level
  of the root; `since` keeps those from its day on).
A day folder that does not exist (yet) is simply empty: counted and warned about, never an
error, and nothing is lost, since the next run's range starts at or before it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import pyarrow.fs as pafs

from stfpm.errors import UserError
from stfpm.storage import filesystem_for, is_s3

DATE_FIELD = re.compile(r"\{date(?::([^{}]*))?\}")
DEFAULT_FORMAT = "%Y-%m-%d"
LOOKBACK_DAYS = 1
_PROBE = date(2031, 12, 29)  # every field distinct (day > 12), so a format that loses one does not round-trip


def has_date(uri: str | None) -> bool:
    """Whether `uri` is a date template (DateTemplate.parse then checks the rest of it)."""
    return bool(uri) and DATE_FIELD.search(uri) is not None


@dataclass(frozen=True)
class DateTemplate:
    """A source URI with one `{date}` or `{date:FORMAT}` in its path."""
    text: str
    head: str   # before the field
    fmt: str    # strftime format of the field
    tail: str   # after it

    @classmethod
    def parse(cls, uri: str) -> "DateTemplate":
        """The template of `uri`, or a UserError naming what is wrong with it."""
        fields = list(DATE_FIELD.finditer(uri))
        if len(fields) != 1:
            raise UserError(f"{uri}: a date-partitioned source has exactly one {{date}} or {{date:FORMAT}} "
                            f"(found {len(fields)})")
        field = fields[0]
        head, tail = uri[:field.start()], uri[field.end():]
        if "{" in head + tail or "}" in head + tail:
            raise UserError(f"{uri}: only {{date}} or {{date:FORMAT}} may stand in braces")
        fmt = field.group(1) if field.group(1) is not None else DEFAULT_FORMAT
        try:
            round_trip = datetime.strptime(_PROBE.strftime(fmt), fmt).date()
        except ValueError:
            round_trip = None
        if round_trip != _PROBE:
            raise UserError(f"{uri}: {{date:{fmt}}} does not name a day; use a format with year, month and day, "
                            f"e.g. {{date}} ({DEFAULT_FORMAT}) or {{date:%Y/%m/%d}}")
        if is_s3(uri) and "/" not in head[len("s3://"):]:
            raise UserError(f"{uri}: the date must be in the key, not the bucket name (s3://bucket/.../{{date}}/)")
        template = cls(uri, head, fmt, tail)
        if not template.root or template.root in ("/", "s3:"):
            raise UserError(f"{uri}: the date cannot be the first level; put it under a folder")
        return template

    @property
    def root(self) -> str:
        """The folder above the first templated level: partitions count from it."""
        return self.head.rsplit("/", 1)[0] if "/" in self.head else ""

    def uri(self, day: date) -> str:
        return f"{self.head}{day.strftime(self.fmt)}{self.tail}"

    def days(self, first: date, last: date) -> list[date]:
        """The days first..last (inclusive) with distinct URIs."""
        out, seen = [], set()
        for k in range((last - first).days + 1):
            day = first + timedelta(days=k)
            if self.uri(day) not in seen:
                seen.add(self.uri(day))
                out.append(day)
        return out

    def existing_days(self) -> list[date]:
        """Every day whose folder (or file) exists under the root: the levels the field spans are
        listed with a delimiter (S3) or one directory at a time (locally); names that do not
        match the template are ignored."""
        fs, root = filesystem_for(self.root)
        head_part = self.head[len(self.root) + 1:]   # e.g. "day=" of day={date}
        tail_part = self.tail.split("/", 1)[0]       # e.g. ".parquet" of {date}.parquet
        levels = self.fmt.count("/") + 1
        frontier = [root.rstrip("/")]
        for level in range(levels):
            below = []
            for folder in frontier:
                try:
                    entries = fs.get_file_info(pafs.FileSelector(folder, recursive=False, allow_not_found=True))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                below.extend(e.path for e in entries
                             if level == levels - 1 or e.type == pafs.FileType.Directory)
            frontier = below
        found = set()
        prefix = root.rstrip("/") + "/"
        for path in frontier:
            name = path[len(prefix):] if path.startswith(prefix) else None
            if not name or not name.startswith(head_part) or not name.endswith(tail_part):
                continue
            middle = name[len(head_part):len(name) - len(tail_part)]
            try:
                day = datetime.strptime(middle, self.fmt).date()
            except ValueError:
                continue
            if day.strftime(self.fmt) == middle:
                found.add(day)
        return sorted(found)


def days_to_list(template: DateTemplate, last_listed: datetime | None, now: datetime,
                 lookback_days: int = LOOKBACK_DAYS, since: datetime | None = None) -> list[date]:
    """The days a run lists (module docstring): from the last finished run's listing day less
    `lookback_days` to today, or, before any finished run, every existing day folder (from
    `since`'s day on)."""
    if lookback_days < 0:
        raise UserError(f"lookback_days must be a whole number >= 0, got {lookback_days}")
    today = now.date()
    if last_listed is None:
        days = template.existing_days()
        return [d for d in days if since is None or d >= since.date()]
    first = min(last_listed.date(), today) - timedelta(days=lookback_days)
    return template.days(first, max(today, last_listed.date()))


def parse_days(text: str) -> list[date]:
    """`--dates` of `stfpm score`: one day (2026-12-03) or a range FIRST..LAST, inclusive."""
    first, _, last = text.partition("..")
    try:
        a, b = date.fromisoformat(first.strip()), date.fromisoformat((last or first).strip())
    except ValueError:
        raise UserError(f"--dates must be a day (2026-12-03) or a range (2026-12-01..2026-12-03), got {text!r}") \
            from None
    if b < a:
        raise UserError(f"--dates {text}: the range ends before it starts")
    return [a + timedelta(days=k) for k in range((b - a).days + 1)]


def run_started(run_id: str | None) -> datetime | None:
    """The UTC time a run id made by plan.new_run_id starts with (None for another id)."""
    try:
        return datetime.strptime((run_id or "")[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
