"""The mass-delete guard: a round that would delete most of one side stops first.

A sync carries deletes over faithfully, which is also how one mistake (a
folder emptied by accident, the wrong folder deleted on the server, a broken
tool) would empty the other side too.  Like ``rclone bisync --max-delete``,
a round whose plan deletes more than ``max_percent`` of the files one side
holds stops before it acts, and says how to let it through.  Renames are
not deletes; small trees are not guarded (at most :data:`UNGUARDED`
deletes pass whatever the share).

A round with more deletes than that is first planned again after the quiet
time (:func:`big_deletes`), and carried out only when two looks agree: a
deletion still going on (``rm -r`` of a big tree, which a live sync starts
seeing after 0.3 s) is judged whole, not in slices that each pass, and a
copy made just before a delete (a move done as copy and delete) settles
into renames first.  Pure: plans and counts in, a refusal or nothing out.
"""

from __future__ import annotations

from wsfiles.sync.model import Kind, Plan

#: ``--max-delete``'s default: the share of one side's files one round may delete.
MAX_DELETE_PERCENT = 50.0
#: Up to this many deletes in one round pass whatever their share.
UNGUARDED = 10


_DELETES = (Kind.DELETE_LOCAL, Kind.DELETE_REMOTE)


def big_deletes(plan: Plan) -> frozenset[str]:
    """The paths ``plan`` deletes (either side) when they are more than
    :data:`UNGUARDED`, else none: what must look the same twice."""
    paths = frozenset(action.path for action in plan.actions if action.kind in _DELETES)
    return paths if len(paths) > UNGUARDED else frozenset()


class TooManyDeletes(Exception):
    """The plan deletes more than allowed; nothing was done."""


def check_deletes(plan: Plan, local_files: int, remote_files: int, max_percent: float) -> None:
    """Raise TooManyDeletes if ``plan`` deletes more than ``max_percent`` of the
    ``local_files`` here or of the ``remote_files`` on the server."""
    for kind, where, held in (
        (Kind.DELETE_REMOTE, "on the server", remote_files),
        (Kind.DELETE_LOCAL, "here", local_files),
    ):
        deletes = sum(1 for action in plan.actions if action.kind is kind)
        if deletes <= UNGUARDED or deletes * 100 <= max_percent * held:
            continue
        share = f"{deletes * 100 / held:.1f}".removesuffix(".0")
        raise TooManyDeletes(
            f"stopped before deleting {deletes} of the {held} files {where}"
            f" ({share}%, more than --max-delete {max_percent:g}%): this round changed"
            " nothing. If that is what you want, run once with --max-delete 100"
        )
