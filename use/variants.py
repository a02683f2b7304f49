"""Variant effect scores: every VCF record against a reference, scored or skipped with a reason, written as it goes.

    with Reference("genome.fa.gz") as reference:                       # plain, gzip or bgzip FASTA
        calls = read_calls(reference, "calls.vcf.gz", bases=1023)       # one Call per ALT of every record
        scored = score_calls(model, tokenizer, calls, batch_windows=64) # in input order, unscored ones passed on
        write_calls(scored, "calls.vcf.gz", Path("scored.vcf"))         # .vcf/.vcf.gz/.bcf or .tsv

A call's score is LL(alt window) - LL(ref window): a window of `bases` reference bases centred on REF, and
the same span with ALT in place of REF (an indel changes its length, so its score compares windows of
different lengths; `length_matched` fills or trims the alt window's end to the same length instead, so SNVs
and indels rank together). A call that cannot be scored keeps its record in the output with its reason:
`ref_mismatch` (REF is not what the reference reads), `unknown_chrom` (a chromosome the reference lacks;
`chr1` vs `1` aliases are named in the log, not guessed), `out_of_bounds` (REF past the chromosome's end),
`symbolic_alt` (`<DEL>`, `*`, breakends), `no_alt` (ALT `.`). A scored call whose chromosome is shorter
than the window is `scored` with the note `window_truncated`. The output goes to `<out>.partial` as records
are finished and is renamed to `<out>` at the end: a crash leaves the finished part, never a truncated `<out>`.
A VCF output keeps every record as htslib reads it (a symbolic ALT's record without END gets END = its
last REF base, the spec's reading of it).
"""

import csv
import functools
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from data.dna import reverse_complement
from use.inference import encode, token_log_probs
from use.shared_prefix import shared_prefix_log_likelihoods

logger = logging.getLogger(__name__)
SKIP_REASONS = ("ref_mismatch", "unknown_chrom", "out_of_bounds", "symbolic_alt", "no_alt")
_END = '##INFO=<ID=END,Number=1,Type=Integer,Description="End position of the variant">'


def is_plain_gzip(path: str) -> bool:
    """Gzip without BGZF blocks (whose gzip header carries an extra field with the subfield `BC`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(18)
    except OSError:
        return False  # pysam then says what is wrong with the path
    return len(head) == 18 and head[:2] == b"\x1f\x8b" and not (head[3] & 4 and head[12:14] == b"BC")


class Reference:
    """A reference FASTA read on demand: plain or bgzip through pysam (building `.fai`/`.gzi` where missing).

    A plain-gzip file has no random access: its records are read into memory, with a log line saying so
    (`bgzip -d` then `bgzip` makes it random-access).
    """

    def __init__(self, path: str):
        import pysam

        self.path = str(path)
        self._memory = None
        if is_plain_gzip(self.path):  # htslib would print two [E::fai_build...] lines before failing on it
            self._fasta, self._memory = None, self._read_into_memory()
            self.lengths = {name: len(sequence) for name, sequence in self._memory.items()}
            return
        quiet = pysam.set_verbosity(0)  # htslib's "[E::fai_build_core] ..." line: ours below says it
        try:
            self._fasta = pysam.FastaFile(self.path)
        except (OSError, ValueError) as error:
            if not self.path.endswith((".gz", ".bgz")):
                hint = (
                    ": indexing it (.fai) needs a '>' header first and, within each record, lines of one length "
                    "(rewrap with `seqkit seq -w 60`)"
                    if os.path.exists(self.path)
                    else ""
                )
                raise FileNotFoundError(
                    f"--reference {self.path} could not be read as FASTA ({error}){hint}."
                ) from error
            self._fasta, self._memory = None, self._read_into_memory()
        finally:
            pysam.set_verbosity(quiet)
        names = self._fasta.references if self._fasta else list(self._memory)
        self.lengths = {name: self.length_of(name) for name in names}

    def _read_into_memory(self) -> dict[str, str]:
        import dnaio

        logger.warning("%s is gzip, not bgzip: read whole into memory (bgzip it for random access).", self.path)
        with dnaio.open(self.path) as reader:
            return {record.name.split(" ", 1)[0]: record.sequence for record in reader}

    def length_of(self, chrom: str) -> int:
        """The chromosome's length in bases."""
        return self._fasta.get_reference_length(chrom) if self._fasta else len(self._memory[chrom])

    def fetch(self, chrom: str, start: int, end: int) -> str:
        """Bases [start, end) (0-based) of `chrom`, in the file's case."""
        return self._fasta.fetch(chrom, start, end) if self._fasta else self._memory[chrom][start:end]

    def alias_of(self, chrom: str) -> str | None:
        """The reference's name for `chrom` under the usual `chr` prefix difference (`1` vs `chr1`), if any."""
        other = chrom.removeprefix("chr") if chrom.startswith("chr") else f"chr{chrom}"
        return other if other in self.lengths else None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._fasta is not None:
            self._fasta.close()


@dataclass
class Call:
    """One ALT of one VCF record, its windows, and what became of it."""

    record: int  # the record's index in the VCF (0-based, input order)
    chrom: str
    pos: int
    id: str | None
    ref: str
    alt: str | None
    status: str = "scored"
    note: str = ""
    start: int | None = None
    ref_window: str | None = None
    alt_window: str | None = None
    ll_ref: float | None = None
    ll_alt: float | None = None
    score: float | None = None


def variant_windows(
    fetch, length: int, pos0: int, ref: str, alt: str, bases: int, length_matched: bool = False
) -> tuple[int, str, str]:
    """(start, ref window, alt window) for a variant at 0-based `pos0` of a sequence of `length` bases.

    The ref window is `bases` reference bases (`fetch(start, end)`) centred on REF; the alt window is the
    same span with ALT in place of REF. REF always lies inside the window. With `length_matched` the alt
    window is then cut, or filled with the reference bases that follow, to the ref window's length.
    """
    start = max(0, min(pos0 - (bases - len(ref)) // 2, length - bases))
    ref_window = fetch(start, start + bases)
    offset = pos0 - start
    alt_window = ref_window[:offset] + alt + ref_window[offset + len(ref) :]
    if length_matched and len(alt_window) < len(ref_window):  # a deletion: filled with the bases that follow
        end = start + len(ref_window)
        alt_window += fetch(end, end + len(ref_window) - len(alt_window))
    if length_matched:  # an insertion: cut (a deletion near the chromosome's end stays short)
        alt_window = alt_window[: len(ref_window)]
    return start, ref_window, alt_window


def read_calls(
    reference: Reference, vcf_path: str, bases: int, length_matched: bool = False, stop_on: Iterable[str] = ()
) -> Iterator[Call]:
    """Every ALT of every record of the VCF as a `Call`, in input order; unscorable ones carry their reason.

    `stop_on`: reasons (`SKIP_REASONS`) that raise a `ValueError` naming the call instead of passing it on.
    Every record is read once here, before the calls are handed out: a malformed line stops the run before
    any output is opened.
    """
    _warn_about_the_vcf(reference, vcf_path)
    return _read_calls(reference, vcf_path, bases, length_matched, set(stop_on))


def _read_calls(reference: Reference, vcf_path: str, bases: int, length_matched: bool, stop_on: set) -> Iterator[Call]:
    import pysam

    quiet = pysam.set_verbosity(0)  # htslib's warning per record with an undeclared key: said once above
    try:
        with pysam.VariantFile(vcf_path) as vcf:
            for index, record in enumerate(vcf):
                for call in _calls_of(index, record, reference, bases, length_matched):
                    if call.status in stop_on:
                        raise ValueError(
                            f"{vcf_path}: {call.chrom}:{call.pos} {call.ref}>{call.alt} cannot be scored "
                            f"({call.status}{': ' + call.note if call.note else ''}); pass --on-error skip "
                            "to write it with its reason and go on."
                        )
                    yield call
    finally:
        pysam.set_verbosity(quiet)


def undeclared_header_lines(vcf_path: str) -> tuple[list[str], set[str]]:
    """The header lines htslib adds as it reads the records (INFO keys, contigs not declared), and the chromosomes."""
    if not os.path.isfile(vcf_path):
        raise FileNotFoundError(f"--vcf {vcf_path} does not exist; point it at a VCF or BCF file.")
    stat = os.stat(vcf_path)
    return _scan_vcf(vcf_path, stat.st_mtime_ns, stat.st_size)  # read_calls and the VCF writer share one pass


@functools.lru_cache(maxsize=4)
def _scan_vcf(vcf_path: str, mtime_ns: int, size: int) -> tuple[list[str], set[str]]:
    import pysam

    quiet = pysam.set_verbosity(0)
    chroms, last = set(), None
    try:
        with pysam.VariantFile(vcf_path) as vcf:
            declared = set(str(vcf.header).splitlines())
            for last in vcf:  # every record read before any is scored: a bad line stops the run before work
                chroms.add(last.chrom)
            added = [line for line in str(vcf.header).splitlines() if line not in declared]
    except OSError as e:  # htslib's "truncated file" for any line it cannot parse
        after = f"after {last.chrom}:{last.pos}" if last is not None else "before the first record"
        raise ValueError(
            f"{vcf_path} could not be read {after} ({e}): a malformed record or a cut file; check it with "
            "`bcftools view` and fix or drop that line."
        ) from None
    finally:
        pysam.set_verbosity(quiet)
    return added, chroms


def _warn_about_the_vcf(reference: Reference, vcf_path: str) -> None:
    """One line each for what the VCF's header lacks and for chromosomes named otherwise in the reference."""
    added, chroms = undeclared_header_lines(vcf_path)
    if added:
        names = [
            line.removeprefix("##").split(",")[0].replace("=<ID=", "/").replace("contig/", "contig ").rstrip(">")
            for line in added
        ]
        logger.warning(
            "%s uses what its header does not declare (%s): read as htslib reads it (END as a position).",
            vcf_path,
            ", ".join(names),
        )
    aliases = {
        c: reference.alias_of(c) for c in sorted(chroms) if c not in reference.lengths and reference.alias_of(c)
    }
    if aliases:
        logger.warning(
            "Chromosomes of %s not in the reference under that name but under another: %s; rename "
            "them (e.g. bcftools annotate --rename-chrs) to score those records.",
            vcf_path,
            ", ".join(f"{a} (reference: {b})" for a, b in aliases.items()),
        )


def _calls_of(index: int, record, reference: Reference, bases: int, length_matched: bool) -> list[Call]:
    alts = record.alts or (None,)
    calls = [Call(index, record.chrom, record.pos, record.id, record.ref, alt) for alt in alts]
    length = reference.lengths.get(record.chrom)
    pos0, ref = record.pos - 1, record.ref or ""
    genome_ref = None if length is None else reference.fetch(record.chrom, pos0, pos0 + len(ref))
    for call in calls:
        if length is None:
            call.status = "unknown_chrom"
        elif pos0 + len(ref) > length:
            call.status, call.note = "out_of_bounds", f"the chromosome has {length} bases"
        elif genome_ref.upper() != ref.upper():
            call.status, call.note = "ref_mismatch", f"the reference reads {genome_ref}"
        elif call.alt is None or call.alt == ".":
            call.status = "no_alt"
        elif call.alt.startswith("<") or not call.alt.isalpha():  # <DEL>, *, breakends
            call.status = "symbolic_alt"
        else:
            fetch = lambda a, b, chrom=record.chrom: reference.fetch(chrom, a, b)  # noqa: E731
            call.start, call.ref_window, call.alt_window = variant_windows(
                fetch, length, pos0, ref, call.alt, bases, length_matched
            )
            call.note = "window_truncated" if length < bases else ""
    return calls


def score_calls(
    model, tokenizer, calls: Iterable[Call], batch_windows: int, both_strands: bool = False, share_prefix: bool = False
):
    """The calls in input order, the scorable ones with LL(ref), LL(alt) and their difference filled in.

    `both_strands`: each LL is the mean over the windows and their reverse complements. `share_prefix`: the
    bases a REF and an ALT window share before the variant run once, through the KV cache (`use/shared_prefix.py`).
    """
    strands = (lambda s: s, reverse_complement) if both_strands else (lambda s: s,)
    pending = []

    def flush():
        pairs = [(f(c.ref_window), f(c.alt_window)) for c in pending if c.ref_window for f in strands]
        texts = [t for pair in pairs for t in pair]
        if share_prefix and isinstance(model, torch.nn.Module):
            ll_of = _shared_prefix_lls(model, tokenizer, list(dict.fromkeys(pairs)), batch_windows)
        else:
            distinct = list(dict.fromkeys(texts))  # the REF window of a multi-allelic site, a repeated record: once
            scored = token_log_probs(model, [encode(tokenizer, t) for t in distinct])
            ll_of = {t: float(x.sum()) for t, x in zip(distinct, scored)}
        lls = iter(ll_of[t] for t in texts)
        for call in pending:
            if call.ref_window:
                pairs = [(next(lls), next(lls)) for _ in strands]  # (LL ref, LL alt) per strand
                call.ll_ref, call.ll_alt = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
                call.score = call.ll_alt - call.ll_ref
        yield from pending
        pending.clear()

    for call in calls:
        pending.append(call)
        if sum(c.ref_window is not None for c in pending) * 2 * len(strands) >= batch_windows:
            yield from flush()
    yield from flush()


def _shared_prefix_lls(model, tokenizer, pairs: list[tuple[str, str]], batch_windows: int) -> dict[str, float]:
    """LL of each window of the (REF, ALT) `pairs`, the bases they share first run once per pair.

    `batch_windows // 2` pairs per call, whatever their lengths (`shared_prefix_log_likelihoods` pads them).
    """
    rows = max(1, batch_windows // 2)
    ll_of = {}
    for i in range(0, len(pairs), rows):
        part = pairs[i : i + rows]
        prefixes, tails = [], ([], [])
        for ref, alt in part:
            shared = min(len(os.path.commonprefix([ref, alt])), len(ref) - 1, len(alt) - 1)  # each keeps >= 1 base
            prefixes.append(encode(tokenizer, ref[:shared]))
            for k, window in enumerate((ref, alt)):
                tails[k].append(encode(tokenizer, window[shared:])[1:])  # no <BOS>: the prefix goes on
        lls = shared_prefix_log_likelihoods(model, prefixes, list(tails), rows)
        for (ref, alt), ll_ref, ll_alt in zip(part, lls[0], lls[1]):
            ll_of[ref], ll_of[alt] = float(ll_ref), float(ll_alt)
    return ll_of


def write_calls(calls: Iterable[Call], vcf_path: str, out: Path) -> dict[str, int]:
    """Write every call (TSV) or every record (VCF/BCF with INFO/LLR and INFO/LLR_STATUS); the status counts.

    Written to `<out>.partial` as the calls arrive, renamed to `out` when all are written.
    """
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    counts = dict.fromkeys(("scored", *SKIP_REASONS), 0)
    tally = _tallied(calls, counts)
    if out.suffix in (".tsv", ".txt"):
        _write_tsv(tally, partial)
    else:
        _write_vcf(tally, vcf_path, partial)
    os.replace(partial, out)
    return counts


def _tallied(calls: Iterable[Call], counts: dict) -> Iterator[Call]:
    for call in calls:
        counts[call.status] += 1
        yield call


def _write_tsv(calls: Iterable[Call], path: Path) -> None:
    columns = ["chrom", "pos", "id", "ref", "alt", "window_start", "ll_ref", "ll_alt", "score", "status", "note"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(columns)
        for c in calls:
            values = [c.chrom, c.pos, c.id or ".", c.ref, c.alt or ".", c.start, c.ll_ref, c.ll_alt, c.score]
            writer.writerow(["." if v is None else v for v in values] + [c.status, c.note or "."])
            f.flush()


def _complete_header(header, declared: list[str]) -> None:
    """Add the output's header lines to the input's, before its records are read.

    What htslib adds as it reads (records and output then share one complete header: no translation, valid
    BCF), END as the spec's Integer, and the two INFO keys of the scores.
    """
    present = set(str(header).splitlines())
    for line in declared:
        if line.startswith("##") and not line.startswith("##INFO=<ID=END,") and line not in present:
            header.add_line(line)
    if "END" not in header.info:  # htslib writes END on a symbolic ALT's record and fails without it
        header.add_line(_END)  # (the spec's Integer; htslib's stand-in for an undeclared END is a String)
    header.info.add("LLR", "A", "Float", "log-likelihood ratio LL(alt window) - LL(ref window) (score.py)")
    header.info.add("LLR_STATUS", "A", "String", "scored, or why not: " + ", ".join(SKIP_REASONS))


def _write_vcf(calls: Iterable[Call], vcf_path: str, path: Path) -> None:
    """The input's records, untouched but for INFO/LLR and INFO/LLR_STATUS (one value per ALT)."""
    import pysam

    declared = undeclared_header_lines(vcf_path)[0]  # what htslib adds as it reads: declared before reading
    calls = iter(calls)
    pending = next(calls, None)
    with pysam.VariantFile(vcf_path) as vcf:
        mode = "wb" if path.name.endswith(".bcf.partial") else "wz" if path.name.endswith(".gz.partial") else "w"
        quiet = pysam.set_verbosity(0)  # htslib's "AD should be declared as Number=R": said once, when read
        try:
            _complete_header(vcf.header, declared)
            writer = pysam.VariantFile(str(path), mode, header=vcf.header)
        finally:
            pysam.set_verbosity(quiet)  # a record htslib cannot write: its message before ours
        with writer:
            for index, record in enumerate(vcf):
                mine = []
                while pending is not None and pending.record == index:
                    mine.append(pending)
                    pending = next(calls, None)
                if record.alts:  # (a record without ALT gets its status only in the count)
                    record.info["LLR"] = tuple(c.score for c in mine)
                    record.info["LLR_STATUS"] = tuple(c.status for c in mine)
                try:
                    writer.write(record)
                except OSError as e:  # htslib's reason went to stderr just before
                    raise ValueError(
                        f"{record.chrom}:{record.pos} of {vcf_path} could not be written to {path} ({e.strerror}; "
                        f"htslib's message above); the records before it are there. A .tsv output (--out "
                        f"{path.name.removesuffix('.partial').split('.')[0]}.tsv) takes every record."
                    ) from e
