"""Pair a zip's members into samples: each fg_bg member with its bg, mask and depth members.

Duplicates are never resolved by guessing: a sample that needs a member listed twice is skipped,
both entries reported (see `store.convert`, which reads and writes the pairs).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from pipeline.schema import FIELDS
from pipeline.store.names import Member, SampleId, classify, refused_sample, shown_name


class Pairing(NamedTuple):
    """One sample's members: fg_bg defines it; the others may be missing (None)."""

    sample: SampleId
    fg_bg: Member
    mask: Member | None
    depth: Member | None
    problem: str | None = None  # why it cannot be used, found while pairing (a duplicate member)


class Pairings(NamedTuple):
    """A zip's members sorted out: its samples, its backgrounds, and what pairing ruled out."""

    pairs: list[Pairing]  # sorted by sample id
    bgs: dict[int, Member]  # by background number
    bg_problems: dict[int, str]  # background number -> why no sample may use it (duplicates)
    skipped: list[dict]  # duplicate fg_bg members, and ones whose names have huge numbers


def pair_members(zip_name: str, names: Iterable[str]) -> Pairings:
    """Classify members into samples and backgrounds; duplicates are never resolved silently."""
    found: dict[str, dict] = {kind: {} for kind in FIELDS}
    twins: dict[tuple[str, object], list[str]] = {}  # (kind, bg number or sample) -> all names
    skipped: list[dict] = []
    for name in names:
        member = classify(name)
        if member is None:
            problem = refused_sample(name)  # a sample member ignored would be a sample lost
            if problem:
                skipped.append(skip_entry(zip_name, name, problem))
            continue
        ident = member.bg if member.kind == "bg" else member.sample
        first = found[member.kind].setdefault(ident, member)
        if first is member:
            continue
        if member.kind == "fg_bg":  # the sample itself: the first is converted, this one reported
            skipped.append(skip_entry(zip_name, name, f"duplicate of sample member {first.name}"))
        if member.kind != "fg_bg" or name == first.name:  # which copy is right is unknown (of
            twins.setdefault((member.kind, ident), [first.name]).append(name)  # one name: none)
    bg_problems = {
        ident: f"duplicate bg members for background {ident}: {' and '.join(names)}"
        for (kind, ident), names in twins.items()
        if kind == "bg"
    }
    masks, depths = found["mask"], found["depth"]
    pairs = [
        _pair(sid, m, found, twins)
        if twins
        else Pairing(sid, m, masks.get(sid), depths.get(sid))  # no duplicate: no problem
        for sid, m in sorted(found["fg_bg"].items())
    ]
    return Pairings(pairs, found["bg"], bg_problems, skipped)


def _pair(sample: SampleId, fg_bg: Member, found: dict, twins: dict) -> Pairing:
    problem = None
    for kind in FIELDS:  # a bg twin is keyed by its number, never by a sample
        if (kind, sample) in twins:
            names = " and ".join(twins[kind, sample])
            problem = problem or f"duplicate {kind} members for {sample.stem()}: {names}"
    return Pairing(sample, fg_bg, found["mask"].get(sample), found["depth"].get(sample), problem)


def skip_entry(zip_name: str, member: str, reason: str) -> dict:
    """A skip report entry, a name's bytes that are not UTF-8 shown as text (`shown_name`)."""
    return {"zip": zip_name, "member": shown_name(member), "reason": shown_name(reason)}
