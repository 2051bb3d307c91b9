"""Schedules: one five-field cron expression for both schedulers (Kubernetes CronJob and EventBridge).

    python -c "from launch.cron import to_eventbridge; print(to_eventbridge('0 3 * * 1-5'))"

Users write standard cron (`minute hour day-of-month month day-of-week`, as in crontab and CronJob).
EventBridge Scheduler wants `cron(min hour dom month dow year)` with days of week numbered 1-7 from
Sunday and `?` in one of the two day fields, so days of week are converted to names (MON,TUE,...).
Standard cron treats a day-of-month AND a day-of-week restriction as "either"; EventBridge cannot say
that, so it is refused with a clear message instead of silently meaning something else.
"""

from __future__ import annotations

import re
from datetime import date, timedelta

MACROS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0",
          "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *"}
DAY_NAMES = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
MONTH_NAMES = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
FIELDS = [("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7)]
_ITEM = re.compile(r"^(\*|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?$")


class CronError(ValueError):
    pass


def _value(token: str, index: int) -> int:
    name, low, high = FIELDS[index]
    names = MONTH_NAMES if index == 3 else DAY_NAMES if index == 4 else []
    if token.upper() in names:
        return names.index(token.upper()) + (1 if index == 3 else 0)
    if not token.isdigit():
        raise CronError(f"{name}: {token!r} is not a number" + (f" or one of {','.join(names)}" if names else ""))
    value = int(token)
    if not low <= value <= high:
        raise CronError(f"{name}: {value} is outside {low}-{high}")
    return value


def expand(field: str, index: int) -> set[int]:
    """The set of values a cron field selects (validating it on the way)."""
    name, low, high = FIELDS[index]
    values: set[int] = set()
    for item in field.split(","):
        if not _ITEM.match(item):
            raise CronError(f"{name}: {item!r} is not valid cron (use *, N, N-M, */S, N-M/S or lists of them)")
        span, _, step_text = item.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise CronError(f"{name}: step {step} must be 1 or more")
        if span == "*":
            first, last = low, high
        elif "-" in span:
            a, b = span.split("-")
            first, last = _value(a, index), _value(b, index)
            if first > last:
                raise CronError(f"{name}: range {span!r} runs backwards")
        else:
            first = _value(span, index)
            last = high if step_text else first
        values.update(range(first, last + 1, step))
    if index == 4 and 7 in values:  # 7 is Sunday too
        values = (values - {7}) | {0}
    return values


def parse(expression: str) -> list[str]:
    """The five fields of a standard cron expression (macros expanded); CronError when invalid."""
    text = MACROS.get(expression.strip().lower(), expression.strip())
    fields = text.split()
    if len(fields) != 5:
        raise CronError(f"{expression!r}: expected 5 fields (minute hour day-of-month month day-of-week),"
                        f" e.g. '0 3 * * 1' for 03:00 every Monday; got {len(fields)}")
    for i, f in enumerate(fields):
        expand(f, i)
    return fields


def to_kubernetes(expression: str) -> str:
    return " ".join(parse(expression))


def to_eventbridge(expression: str) -> str:
    minute, hour, dom, month, dow = parse(expression)
    if dom != "*" and dow != "*":
        raise CronError(f"{expression!r}: a day-of-month and a day-of-week together mean 'either' in cron, which"
                        " EventBridge Scheduler cannot express; restrict only one of the two fields")
    if dow == "*":
        dow_eb = "?"
    else:
        days = expand(dow, 4)
        dow_eb = "?" if len(days) == 7 else ",".join(DAY_NAMES[d] for d in sorted(days))
        dom = "?" if dow_eb != "?" else dom
    return f"cron({minute} {hour} {dom} {month} {dow_eb} *)"


def min_interval_seconds(expression: str, first_day: date = date(2026, 1, 1), years: int = 4) -> int | None:
    """The shortest time between two starts of the schedule (over `years` years of the calendar, in its own time
    zone; a daylight-saving change can shorten one interval by an hour), or None when it starts at most once."""
    minute, hour, dom, month, dow = parse(expression)
    offsets = sorted(h * 60 + m for h in expand(hour, 1) for m in expand(minute, 0))  # minutes into a day
    days_of_month, months, days_of_week = expand(dom, 2), expand(month, 3), expand(dow, 4)
    either = not dom.startswith("*") and not dow.startswith("*")  # cron's rule when both day fields are restricted
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    previous = None
    for i in range(366 * years + 1):
        day = first_day + timedelta(days=i)
        weekday = (day.weekday() + 1) % 7  # cron counts from Sunday = 0
        in_dom, in_dow = day.day in days_of_month, weekday in days_of_week
        if day.month in months and ((in_dom or in_dow) if either else (in_dom and in_dow)):
            if previous is not None:
                gaps.append((i - previous) * 1440 + offsets[0] - offsets[-1])
            previous = i
    return min(gaps) * 60 if gaps else None
