"""Synthetic fact domains: names, templates as in the paper, probes, errors."""

import re

import pytest

from jaxeif.data import domains


def test_names_are_seeded_distinct_and_pronounceable():
    a, b = domains.random_names(200, seed=3), domains.random_names(200, seed=3)
    assert a == b and len(set(a)) == 200
    assert domains.random_names(5, seed=4) != domains.random_names(5, seed=3)
    for name in a:
        assert re.fullmatch(r"[a-z]+", name)
        assert not re.search(r"[^aeiouy]{4}", name), name  # no unpronounceable consonant runs
        vowel_groups = re.findall(r"[aeiouy]+", name)
        assert 2 <= len(vowel_groups) <= 5, name  # 2 to 5 syllables


def test_paper_domains_sizes_and_templates():
    sizes = {"chain_induces": 5, "belongs_to": 10, "transitivity": 12}
    for name, n in sizes.items():
        assert len(domains.DOMAINS[name].templates) == n
    chain = domains.draw("chain_induces", seed=0)
    assert len(chain[3].lines) == 4 and len(chain[2].lines) == 2
    a = chain[1].text.split()[1]
    assert chain[0].text.startswith(f"Whenever {a} happens") and chain[4].text.endswith(f"causes {a} to happen.")
    assert domains.draw("belongs_to", seed=0)[9].text == "Frogs and toads often hibernate in winter."
    assert "squares" in domains.DOMAINS and "bigger_than" in domains.DOMAINS


def test_fresh_names_per_repeat_and_every_sample_labelled():
    for name, d in domains.DOMAINS.items():
        s0, s1 = domains.draw(name, 0), domains.draw(name, 1)
        assert [s.template for s in s0] == [t for t, _ in d.templates]
        assert all(s.label and s.text.strip() and "{" not in s.text for s in s0)
        if d.slots:
            assert [s.text for s in s0] != [s.text for s in s1]


def test_probes_point_inside_their_domain_and_differ():
    for name, d in domains.DOMAINS.items():
        assert d.probes, name
        for p, rows in zip(d.probes, d.probe_rows, strict=True):
            assert [d.templates[i][1] for i in rows[:3]] == list(p[:3])  # the labels' own templates
            assert p.implied != p.not_implied and p.why == rows.why


def test_probes_follow_their_templates_and_unknown_labels_are_errors():
    d = domains.DOMAINS["bigger_than"]
    moved = domains.Domain("moved", (("{A} is as big as {B}.", "new first"), *d.templates), d.probes)
    assert [tuple(r[:3]) for r in moved.probe_rows] == [tuple(i + 1 for i in r[:3]) for r in d.probe_rows]
    with pytest.raises(ValueError, match=r"probe 'why' names unknown template labels \['premise A > Z'\]"):
        domains.Domain("bad", d.templates, (domains.Probe("premise A > Z", "premise A > B", "premise B > C", "why"),))
    with pytest.raises(ValueError, match=r"template labels \['x'\] repeat"):
        domains.Domain("twice", (("{A}.", "x"), ("{B}.", "x")), ())


def test_unknown_domain_lists_valid_ones():
    with pytest.raises(ValueError, match="chain_induces.*belongs_to"):
        domains.draw("ontology", 0)
