"""use/variants.py without a model: what each VCF record becomes, the windows, the reference forms, the output.

The scores here are stand-ins (a call's score = its record index); test_use_model.py checks real scores.
"""

import gzip

import pysam
import pytest

from use import variants
from use.variants import SKIP_REASONS, Reference, is_plain_gzip, read_calls, variant_windows, write_calls

CHR1 = "ACGTTGCAAC" * 30 + "acgtacgtac" * 5 + "GGCCTTAAGC" * 15  # 500 bases, a soft-masked stretch
CHR2 = "TTGACCA" * 20  # 140 bases, shorter than the window
# (chrom, pos, id, ref, alt, info) and the status of each of its ALTs.
RECORDS = [
    (("chr1", 100, "snv", CHR1[99], "A" if CHR1[99] != "A" else "C", "."), ["scored"]),
    (("chr1", 320, "masked", CHR1[319].upper(), "T", "."), ["scored"]),  # REF in capitals, reference lowercase
    (("chr1", 200, "multi", CHR1[199], "G,*", "."), ["scored", "symbolic_alt"]),
    (("chr1", 250, "sv", CHR1[249], "<DEL>", "SVTYPE=DEL;END=300"), ["symbolic_alt"]),  # INFO keys not declared
    (("chr1", 260, "bnd", CHR1[259], "C[chr2:5[", "."), ["symbolic_alt"]),
    (("chr1", 270, "noalt", CHR1[269], ".", "."), ["no_alt"]),
    (("chr1", 280, "mismatch", "N", "A", "."), ["ref_mismatch"]),
    (("chr1", 499, "pastend", "ACG", "A", "."), ["out_of_bounds"]),
    (("1", 50, "alias", CHR1[49], "T", "."), ["unknown_chrom"]),  # the reference names it chr1
    (("chrUn", 5, "unknown", "A", "T", "."), ["unknown_chrom"]),
    (("chr2", 70, "short", CHR2[69:72], CHR2[69], "."), ["scored"]),  # a deletion on a chromosome < window
]


@pytest.fixture
def files(tmp_path):
    reference = tmp_path / "ref.fa"
    reference.write_text(f">chr1 first\n{CHR1}\n>chr2\n{CHR2}\n")
    header = ["##fileformat=VCFv4.2", "##contig=<ID=chr1,length=500>", "##contig=<ID=chr2,length=140>",
              "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"]  # fmt: skip
    body = ["\t".join(map(str, (c, p, i, r, a, ".", ".", info))) for (c, p, i, r, a, info), _ in RECORDS]
    vcf = tmp_path / "calls.vcf"
    vcf.write_text("\n".join(header + body) + "\n")
    return reference, vcf


def stand_in_scores(calls):
    for call in calls:
        if call.status == "scored":
            call.ll_ref, call.ll_alt, call.score = -1.0, -1.0 - call.record, -float(call.record)
        yield call


def test_every_alt_of_every_record_gets_a_status(files, caplog):
    reference, vcf = files
    with Reference(str(reference)) as ref:
        calls = list(read_calls(ref, str(vcf), bases=201))
    assert [(c.id, c.status) for c in calls] == [(r[2], s) for r, statuses in RECORDS for s in statuses]
    by_id = {c.id: c for c in calls}
    assert by_id["mismatch"].note == f"the reference reads {CHR1[279]}"
    assert by_id["pastend"].note == "the chromosome has 500 bases"
    assert by_id["short"].note == "window_truncated" and by_id["short"].ref_window == CHR2  # the whole chromosome
    assert "1 (reference: chr1)" in caplog.text  # the alias is named, not guessed
    assert by_id["masked"].ref_window == CHR1[219:420]  # soft-masked bases keep their case in the window


@pytest.mark.parametrize("reason", SKIP_REASONS)
def test_stop_on_a_reason_names_the_record_and_the_fix(files, reason):
    reference, vcf = files
    with Reference(str(reference)) as ref, pytest.raises(ValueError, match=r"calls.vcf: .* cannot be scored \(") as e:
        list(read_calls(ref, str(vcf), bases=201, stop_on=[reason]))
    assert f"({reason}" in str(e.value) and "--on-error skip" in str(e.value)


def test_windows_are_centred_and_length_matched_on_request():
    genome = CHR1.upper()
    fetch = lambda a, b: genome[a:b]  # noqa: E731
    start, ref_w, alt_w = variant_windows(fetch, len(genome), 100, genome[100], "T", bases=21)
    assert (start, ref_w, alt_w) == (90, genome[90:111], genome[90:100] + "T" + genome[101:111])
    start, ref_w, alt_w = variant_windows(fetch, len(genome), 3, genome[3:6], genome[3], bases=21)  # at the start
    assert start == 0 and alt_w == genome[:4] + genome[6:21] and len(alt_w) == 19
    _, ref_w, alt_w = variant_windows(fetch, len(genome), 3, genome[3:6], genome[3], bases=21, length_matched=True)
    assert alt_w == genome[:4] + genome[6:23] and len(alt_w) == len(ref_w) == 21  # filled from what follows
    _, ref_w, alt_w = variant_windows(fetch, len(genome), 100, genome[100], genome[100] + "GATTACA", 21, True)
    offset = 100 - (100 - 10)
    assert alt_w == (ref_w[: offset + 1] + "GATTACA" + ref_w[offset + 1 :])[:21]  # cut to the ref window's length


def test_plain_gzip_and_bgzip_references_read_the_same(files, tmp_path, capfd):
    reference, vcf = files
    gz, bgz = tmp_path / "ref.fa.gz", tmp_path / "ref.bgz.fa.gz"
    gz.write_bytes(gzip.compress(reference.read_bytes()))
    pysam.tabix_compress(str(reference), str(bgz))
    assert [is_plain_gzip(str(p)) for p in (reference, gz, bgz)] == [False, True, False]
    windows = {}
    for path in (reference, gz, bgz):
        with Reference(str(path)) as ref:
            assert ref.lengths == {"chr1": 500, "chr2": 140}
            windows[path] = [(c.status, c.ref_window, c.alt_window) for c in read_calls(ref, str(vcf), 201)]
    assert windows[reference] == windows[gz] == windows[bgz]
    assert "[E::" not in capfd.readouterr().err  # plain gzip goes to memory without htslib trying to index it
    with pytest.raises(FileNotFoundError, match="could not be read as FASTA"):
        Reference(str(tmp_path / "absent.fa"))
    (tmp_path / "ragged.fa").write_text(">c\nACGTACGT\nACG\nACGTACGT\n")  # faidx needs equal line lengths
    with pytest.raises(FileNotFoundError, match=r"ragged.fa could not be read as FASTA .* lines of one length"):
        Reference(str(tmp_path / "ragged.fa"))


@pytest.mark.parametrize("suffix", [".tsv", ".vcf", ".vcf.gz", ".bcf"])
def test_output_has_every_record_in_order_with_scores_and_statuses(files, tmp_path, suffix):
    reference, vcf = files
    out = tmp_path / f"scored{suffix}"
    with Reference(str(reference)) as ref:
        counts = write_calls(stand_in_scores(read_calls(ref, str(vcf), 201)), str(vcf), out)
    expected = [(r[2], s) for r, statuses in RECORDS for s in statuses]
    assert counts == {s: sum(e == s for _, e in expected) for s in ("scored", *SKIP_REASONS)}
    assert not out.with_name(out.name + ".partial").exists()
    if suffix == ".tsv":
        rows = [line.split("\t") for line in out.read_text().splitlines()]
        assert rows[0][-3:] == ["score", "status", "note"]
        assert [(row[2], row[9]) for row in rows[1:]] == expected
        assert [float(row[8]) for row in rows[1:] if row[9] == "scored"] == [-0.0, -1.0, -2.0, -10.0]
        return
    with pysam.VariantFile(str(out)) as scored:
        records = list(scored)
    assert [r.id for r in records] == [r[2] for r, _ in RECORDS]  # every input record, none dropped
    by_id = {r.id: r for r in records}
    assert by_id["multi"].info["LLR_STATUS"] == ("scored", "symbolic_alt") and by_id["multi"].info["LLR"][0] == -2
    assert by_id["sv"].stop == 300  # INFO/END (undeclared in the input) kept: pysam reads it as the record's end
    assert by_id["sv"].info["SVTYPE"] == "DEL" and by_id["sv"].info["LLR_STATUS"] == ("symbolic_alt",)
    assert "LLR" not in by_id["noalt"].info
    assert by_id["unknown"].info["LLR_STATUS"] == ("unknown_chrom",)


def test_symbolic_alt_without_end_passes_through_to_vcf(files, tmp_path):
    # htslib writes END on a symbolic ALT's record: the writer failed ("INFO tag id=2 is too large") when no
    # record of the input had END, until the output header declared it.
    reference, _ = files
    vcf, out = tmp_path / "sv.vcf", tmp_path / "scored.vcf"
    vcf.write_text(
        "##fileformat=VCFv4.2\n##contig=<ID=chr1,length=500>\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
        f"chr1\t100\tsnv\t{CHR1[99]}\tT\t.\t.\t.\nchr1\t250\tdel\t{CHR1[249]}\t<DEL>\t.\tPASS\tSVLEN=-5\n"
    )
    with Reference(str(reference)) as ref:
        counts = write_calls(stand_in_scores(read_calls(ref, str(vcf), 201)), str(vcf), out)
    assert (counts["scored"], counts["symbolic_alt"]) == (1, 1)
    with pysam.VariantFile(str(out)) as scored:
        snv, sv = list(scored)
    assert snv.info["LLR_STATUS"] == ("scored",) and sv.info["LLR_STATUS"] == ("symbolic_alt",)
    assert sv.info["SVLEN"] == "-5" and sv.stop == 250  # END = POS: the spec's reading of a record without END


def test_a_record_htslib_cannot_write_names_itself_and_the_tsv_fix(files, tmp_path, monkeypatch):
    reference, vcf = files
    vcf.write_text("\n".join(vcf.read_text().splitlines()[:5] + ["chr1\t250\tdel\tA\t<DEL>\t.\t.\tSVLEN=-5"]))
    monkeypatch.setattr(variants, "_END", '##INFO=<ID=X,Number=1,Type=Integer,Description="x">')  # END undeclared
    with Reference(str(reference)) as ref, pytest.raises(ValueError, match=r"chr1:250 of .* could not be written"):
        write_calls(read_calls(ref, str(vcf), 201), str(vcf), tmp_path / "scored.vcf")
    assert (tmp_path / "scored.vcf.partial").exists() and not (tmp_path / "scored.vcf").exists()


def test_a_malformed_record_stops_the_run_before_any_output(files, tmp_path):
    reference, vcf = files
    lines = vcf.read_text().splitlines()  # 4 header lines, then the first record (chr1:100)
    vcf.write_text("\n".join([*lines[:5], "chr1\tX7\tbad\tA\tC\t.\t.\t.", *lines[5:]]) + "\n")
    with (
        Reference(str(reference)) as ref,
        pytest.raises(ValueError, match=r"calls.vcf could not be read after chr1:100 \("),
    ):
        write_calls(read_calls(ref, str(vcf), 201), str(vcf), tmp_path / "scored.vcf")
    assert not list(tmp_path.glob("scored.vcf*"))  # not even a .partial: nothing was scored


def test_a_crash_leaves_the_finished_part_and_no_output(files, tmp_path):
    reference, vcf = files
    out = tmp_path / "scored.tsv"

    def crashing(calls):
        for i, call in enumerate(calls):
            if i == 3:
                raise RuntimeError("CUDA error: out of memory")
            yield call

    with Reference(str(reference)) as ref, pytest.raises(RuntimeError, match="out of memory"):
        write_calls(crashing(stand_in_scores(read_calls(ref, str(vcf), 201))), str(vcf), out)
    assert not out.exists()
    assert len(out.with_name("scored.tsv.partial").read_text().splitlines()) == 1 + 3  # the header, 3 finished


def test_a_vcf_header_that_lacks_keys_and_contigs_gets_one_warning_not_htslibs(files, tmp_path, caplog, capfd):
    reference, _ = files
    vcf = tmp_path / "sloppy.vcf"
    vcf.write_text(
        "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
        "chr1\t50\t.\tA\t<DEL>\t.\t.\tSVTYPE=DEL;END=60\nchrX\t5\t.\tA\tT\t.\t.\t.\n"
    )
    with Reference(str(reference)) as ref:
        calls = list(read_calls(ref, str(vcf), 21))
    assert len(calls) == 2 and calls[1].status == "unknown_chrom"
    message = caplog.text.split("does not declare (")[1].split(")")[0]
    assert sorted(message.split(", ")) == ["INFO/END", "INFO/SVTYPE", "contig chr1", "contig chrX"]
    assert "[W::" not in capfd.readouterr().err
