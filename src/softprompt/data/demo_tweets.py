"""A small real sentiment data set that needs no hub: the human-rated tweets shipped with VADER.

The source distribution of ``vaderSentiment==3.3.2`` (MIT licence, C.J. Hutto) on PyPI contains
``additional_resources/hutto_ICWSM_2014.tar.gz``, whose ``hutto_ICWSM_2014/tweets_GroundTruth.txt``
holds 4,200 tweet-like texts, each with the mean sentiment rating of about 20 human raters on a
-4 (most negative) .. +4 (most positive) scale; lines are ``id<TAB>rating<TAB>text``
(Hutto & Gilbert, ICWSM 2014).

:func:`load_vader_tweets` fetches that sdist once with ``pip download`` (2.4 MB), keeps the extracted
file under ``<cache>/data/`` (checked by SHA-256) and returns the clearly polar tweets only:
``|rating| >= 1.0`` by default, which keeps 2,667 of the 4,200 (1,830 positive, 837 negative) and drops
the near-neutral ones whose label even the raters did not agree on. HTML entities the Twitter API
left in the text (``&amp;``, ``&lt;``...) are unescaped.
"""

from __future__ import annotations

import hashlib
import html
import os
import shlex
import shutil
import tarfile
import tempfile
from pathlib import Path

from softprompt.errors import SoftPromptError
from softprompt.fileio import atomic_write_bytes
from softprompt.models import pypi

VADER_REQUIREMENT = "vaderSentiment==3.3.2"
#: The archive inside the sdist, and the file inside that archive.
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
TWEETS_MEMBER = "hutto_ICWSM_2014/tweets_GroundTruth.txt"
TWEETS_SHA256 = "dfbe7102e2f92579ed8b19df9a3822491880697c67adf712fb66e520cc05102f"
CACHE_NAME = "vader_tweets_GroundTruth.txt"
#: Default polarity threshold on the mean rating (-4..4): 1,830 positive + 837 negative tweets.
POLAR_THRESHOLD = 1.0


def parse_tweets(text: str, min_abs_rating: float = POLAR_THRESHOLD) -> list[dict]:
    """Rows ``{"text", "rating", "label"}`` from ``tweets_GroundTruth.txt`` content, polar ones only.

    A tweet is ``"positive"`` when its mean rating is ``>= min_abs_rating`` and ``"negative"`` when it
    is ``<= -min_abs_rating``; the rest are dropped. File order is kept.
    """
    if min_abs_rating <= 0:
        raise SoftPromptError(f"min_abs_rating: expected a number > 0, got {min_abs_rating!r}")
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        try:
            rating = float(fields[1])
        except (IndexError, ValueError):
            raise SoftPromptError(
                f"{CACHE_NAME} line {lineno}: expected id<TAB>rating<TAB>text, got {line[:60]!r}"
            ) from None
        tweet = html.unescape(fields[2]).strip() if len(fields) > 2 else ""
        if not tweet:
            continue
        if rating >= min_abs_rating:
            rows.append({"text": tweet, "rating": rating, "label": "positive"})
        elif rating <= -min_abs_rating:
            rows.append({"text": tweet, "rating": rating, "label": "negative"})
    return rows


def vader_tweets_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the extracted ``tweets_GroundTruth.txt`` is kept: ``<cache>/data/vader_tweets_GroundTruth.txt``."""
    return pypi.cache_root(cache_dir) / "data" / CACHE_NAME


def _download_args(dest: Path) -> list[str]:
    return ["download", VADER_REQUIREMENT, "--no-deps", "--no-binary", ":all:", "-d", str(dest)]


def _extract_tweets(sdist: Path) -> bytes:
    """The bytes of the tweets file, read from the archive nested inside the sdist (nothing unpacked)."""
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            inner_info = next((m for m in outer.getmembers() if m.name.endswith(INNER_ARCHIVE)), None)
            if inner_info is None:
                raise SoftPromptError(f"{sdist.name}: no {INNER_ARCHIVE} inside")
            with tarfile.open(fileobj=outer.extractfile(inner_info), mode="r:gz") as inner:
                info = next((m for m in inner.getmembers() if m.name.endswith(TWEETS_MEMBER)), None)
                if info is None:
                    raise SoftPromptError(f"{sdist.name}: no {TWEETS_MEMBER} inside {INNER_ARCHIVE}")
                member = inner.extractfile(info)
                if member is None:  # a directory or link of that name, not a file
                    raise SoftPromptError(f"{sdist.name}: {TWEETS_MEMBER} inside {INNER_ARCHIVE} is not a file")
                return member.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SoftPromptError(f"{sdist.name}: not a readable .tar.gz ({exc})") from None


def _fetch(target: Path, *, progress: bool) -> None:
    data_dir = pypi.make_cache_dir(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=".vader-", dir=data_dir))
    try:
        pypi.say(progress, f"softprompt: downloading {VADER_REQUIREMENT} (source, 2.4 MB) from PyPI for its tweets")
        code, err = pypi.run_pip(_download_args(tmp), progress=False)
        sdists = sorted(tmp.glob("*.tar.gz"))
        if code != 0 or not sdists:
            manual = " ".join(shlex.quote(a) for a in pypi.pip_command(*_download_args(Path("DIR"))))
            why = pypi.pip_failure(code, err) if code != 0 else "pip saved no .tar.gz"
            raise SoftPromptError(
                f"the demo tweets come from the PyPI source package {VADER_REQUIREMENT}, and fetching it failed "
                f"({why}). Run this where PyPI is reachable: {manual} ; then extract {TWEETS_MEMBER} from "
                f"{INNER_ARCHIVE} inside it to {target}"
            )
        data = _extract_tweets(sdists[0])
        digest = hashlib.sha256(data).hexdigest()
        if digest != TWEETS_SHA256:
            raise SoftPromptError(f"{sdists[0].name}: {TWEETS_MEMBER} has SHA-256 {digest}, expected {TWEETS_SHA256}")
        atomic_write_bytes(target, data)  # readers see the old file or the whole new one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_vader_tweets(
    cache_dir: str | os.PathLike | None = None, *, min_abs_rating: float = POLAR_THRESHOLD, progress: bool = True
) -> list[dict]:
    """The clearly polar VADER tweets: ``[{"text": str, "rating": float, "label": "positive"|"negative"}]``.

    Fetched from PyPI on first use (``pip download vaderSentiment==3.3.2 --no-deps --no-binary :all:``)
    and cached under ``<cache>/data/``; the cache is ``cache_dir``, ``$SOFTPROMPT_CACHE`` or
    ``~/.cache/softprompt``. With the default ``min_abs_rating=1.0``: 2,667 rows, 1,830 positive and
    837 negative, in file order. Raises :class:`SoftPromptError` (with the command to run by hand)
    when the package cannot be fetched.
    """
    target = vader_tweets_path(cache_dir)
    try:
        data = target.read_bytes()
        fresh = hashlib.sha256(data).hexdigest() != TWEETS_SHA256
    except OSError:
        fresh = True
    if fresh:
        _fetch(target, progress=progress)
        data = target.read_bytes()
    return parse_tweets(data.decode("utf-8", errors="replace"), min_abs_rating)
