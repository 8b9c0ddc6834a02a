"""Seeds loading (every format, every malformed case), domain clustering, the seed store, the task stream."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gra_async.config import PlannerConfig
from gra_async.errors import SeedError
from gra_async.planner import Planner, Task
from gra_async.seeds import Seed, SeedStore, read_seeds

CFG = PlannerConfig()


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(**fields: object) -> str:
    return json.dumps(fields)


def load_seeds(path: Path | None, cfg: PlannerConfig = CFG) -> list[Seed]:
    """The records as read, before the store assigns domains."""
    return [seed for _, seed in read_seeds(path, cfg)]


def assign_domains(seeds: list[Seed], k: int, seed: int) -> list[Seed]:
    return list(SeedStore.of(seeds, domains=k, seed=seed))


def planner_of(seeds: list[Seed], run_seed: int, few_shot: int) -> Planner:
    return Planner(SeedStore.of(seeds), run_seed, few_shot)


def seed_error(path: Path, cfg: PlannerConfig = CFG) -> str:
    with pytest.raises(SeedError) as info:
        SeedStore.build(path, cfg, seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert re.search(r"\(.+\)$", message), f"no advice in parentheses: {message}"
    return message


# --------------------------------------------------------------------------- bundled set


class TestBundledSeeds:
    def test_loads_with_domains_and_unique_ids(self) -> None:
        seeds = load_seeds(None, CFG)
        assert 45 <= len(seeds) <= 60
        assert len({s.id for s in seeds}) == len(seeds)
        counts = Counter(s.domain for s in seeds)
        assert len(counts) == 6 and min(counts.values()) >= 7
        assert all(s.instruction.strip() and s.response.strip() for s in seeds)

    def test_responses_are_concise(self) -> None:
        assert all(len(s.response) < 700 for s in load_seeds(None, CFG))


# --------------------------------------------------------------------------- formats


class TestFormats:
    def test_jsonl_skips_blank_lines_and_numbers_ids_by_line(self, tmp_path: Path) -> None:
        path = write_lines(tmp_path / "s.jsonl", row(instruction="a", response="b"), "",
                           "   ", row(instruction="c", response="d", id="own"),
                           row(instruction="e", response="f"))
        seeds = load_seeds(path, CFG)
        assert [s.id for s in seeds] == ["1", "own", "5"]
        assert seeds[0] == Seed(id="1", instruction="a", response="b", domain="")

    @pytest.mark.parametrize(
        ("fields", "expected"),
        [
            ({"instruction": "Q", "output": "A"}, ("Q", "A", "")),
            ({"prompt": "Q", "answer": "A", "category": "c"}, ("Q", "A", "c")),
            ({"question": "Q", "response": "A", "domain": "d"}, ("Q", "A", "d")),
            ({"question": "Q", "answer": 42}, ("Q", "42", "")),
        ],
        ids=["alpaca-output", "prompt-answer-category", "question-response-domain", "numeric"],
    )
    def test_field_detection(self, tmp_path: Path, fields: dict[str, object],
                             expected: tuple[str, str, str]) -> None:
        seed = load_seeds(write_lines(tmp_path / "s.jsonl", json.dumps(fields)), CFG)[0]
        assert (seed.instruction, seed.response, seed.domain) == expected

    def test_alpaca_input_is_appended_only_when_present(self, tmp_path: Path) -> None:
        path = write_lines(
            tmp_path / "alpaca.jsonl",
            row(instruction="Translate to French.", input="Good morning", output="Bonjour"),
            row(instruction="Name a colour.", input="", output="Blue"),
        )
        first, second = load_seeds(path, CFG)
        assert first.instruction == "Translate to French.\n\nGood morning"
        assert second.instruction == "Name a colour."

    def test_alpaca_json_array(self, tmp_path: Path) -> None:
        path = tmp_path / "alpaca_data.json"
        items = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
        path.write_text(json.dumps(items, indent=2), encoding="utf-8")
        seeds = load_seeds(path, CFG)
        assert [s.instruction for s in seeds] == ["q0", "q1", "q2"]
        assert [s.id for s in seeds] == ["2", "7", "12"]  # the line each item starts on

    def test_configured_mapping_wins(self, tmp_path: Path) -> None:
        cfg = PlannerConfig(instruction_field="q", response_field="a", input_field="ctx",
                            domain_field="topic")
        path = write_lines(tmp_path / "s.jsonl",
                           row(q="Sum?", ctx="1 and 2", a="3", topic="math", instruction="no"))
        seed = load_seeds(path, cfg)[0]
        assert (seed.instruction, seed.response, seed.domain) == ("Sum?\n\n1 and 2", "3", "math")

    def test_csv_with_bom_quotes_and_multiline_cells(self, tmp_path: Path) -> None:
        path = tmp_path / "s.csv"
        path.write_text('\ufeffinstruction,response,domain\n'
                        '"Say ""hi"", politely",Hello,talk\n'
                        '"Two\nlines",ok,\n', encoding="utf-8")
        first, second = load_seeds(path, CFG)
        assert (first.instruction, first.response, first.domain, first.id) == (
            'Say "hi", politely', "Hello", "talk", "2")
        assert (second.instruction, second.id, second.domain) == ("Two\nlines", "3", "")

    def test_csv_row_errors_name_the_starting_line(self, tmp_path: Path) -> None:
        path = tmp_path / "s.csv"
        path.write_text('instruction,response\n"multi\nline",ok\n\nonly-one-cell\n', encoding="utf-8")
        assert seed_error(path).startswith(f"{path}:5: 1 cells but 2 header columns")
        path.write_text("instruction,response\na,b,c\n", encoding="utf-8")
        assert seed_error(path).startswith(f"{path}:2: 3 cells but 2 header columns")

    def test_parquet(self, tmp_path: Path) -> None:
        path = tmp_path / "s.parquet"
        pq.write_table(pa.table({"prompt": ["p1", "p2"], "output": ["o1", "o2"],
                                 "category": ["x", None]}), path)
        seeds = load_seeds(path, CFG)
        assert [(s.id, s.instruction, s.response, s.domain) for s in seeds] == [
            ("1", "p1", "o1", "x"), ("2", "p2", "o2", "")]

    def test_arrow_stream_as_written_by_save_to_disk(self, tmp_path: Path) -> None:
        path = tmp_path / "data-00000-of-00001.arrow"
        table = pa.table({"instruction": ["i1"], "output": ["o1"]})
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        assert load_seeds(path, CFG) == [Seed("1", "i1", "o1", "")]

    def test_json_suffix_with_json_lines(self, tmp_path: Path) -> None:
        path = write_lines(tmp_path / "s.json", row(instruction="a", response="b"),
                           row(instruction="c", response="d"))
        assert [s.instruction for s in load_seeds(path, CFG)] == ["a", "c"]

    def test_directory_of_files_prefixes_ids(self, tmp_path: Path) -> None:
        folder = tmp_path / "snapshot"
        (folder / "data").mkdir(parents=True)
        write_lines(folder / "data" / "a.jsonl", row(instruction="a", response="b"))
        pq.write_table(pa.table({"instruction": ["c"], "response": ["d"]}),
                       folder / "data" / "b.parquet")
        (folder / "README.md").write_text("not a seed file", encoding="utf-8")
        (folder / "dataset_info.json").write_text('{\n "features": {}\n}', encoding="utf-8")
        seeds = load_seeds(folder, CFG)
        assert [s.id for s in seeds] == ["data/a.jsonl:1", "data/b.parquet:1"]


# --------------------------------------------------------------------------- errors


class TestSeedErrors:
    def test_missing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "nope.jsonl"
        assert seed_error(path).startswith(f"{path}: seeds file not found")

    @pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["empty", "blank-lines"])
    def test_empty_file(self, tmp_path: Path, content: str) -> None:
        path = tmp_path / "s.jsonl"
        path.write_text(content, encoding="utf-8")
        assert seed_error(path).startswith(f"{path}: the file is empty")

    def test_invalid_json_line(self, tmp_path: Path) -> None:
        path = write_lines(tmp_path / "s.jsonl", row(instruction="a", response="b"), "",
                           '{"instruction": "a", "response": ')
        assert seed_error(path).startswith(f"{path}:3: invalid JSON")

    @pytest.mark.parametrize("line", ['["a", "b"]', '"text"', "42", "null"])
    def test_line_not_an_object(self, tmp_path: Path, line: str) -> None:
        path = write_lines(tmp_path / "s.jsonl", row(instruction="a", response="b"), line)
        assert seed_error(path).startswith(f"{path}:2: expected a JSON object")

    def test_missing_fields_lists_the_fields_found(self, tmp_path: Path) -> None:
        path = write_lines(tmp_path / "s.jsonl", row(text="a", label="b"))
        message = seed_error(path)
        assert message.startswith(f"{path}:1: no instruction/prompt/question or response/output/answer")
        assert "found: label, text" in message

    def test_missing_response_only(self, tmp_path: Path) -> None:
        path = write_lines(tmp_path / "s.jsonl", row(instruction="a", reply="b"))
        message = seed_error(path)
        assert message.startswith(f"{path}:1: no response/output/answer field (found: instruction, reply)")

    def test_configured_field_absent(self, tmp_path: Path) -> None:
        path = write_lines(tmp_path / "s.jsonl", row(instruction="a", response="b"))
        message = seed_error(path, PlannerConfig(domain_field="topic"))
        assert message.startswith(f"{path}:1: no 'topic' field")

    def test_empty_value(self, tmp_path: Path) -> None:
        path = write_lines(tmp_path / "s.jsonl", row(instruction="a", response="  "))
        assert seed_error(path).startswith(f"{path}:1: field 'response' is empty")

    def test_non_text_value(self, tmp_path: Path) -> None:
        path = write_lines(tmp_path / "s.jsonl", row(instruction=["a"], response="b"))
        assert seed_error(path).startswith(f"{path}:1: field 'instruction' is a list")

    def test_duplicate_id(self, tmp_path: Path) -> None:
        path = write_lines(tmp_path / "s.jsonl", row(id=7, instruction="a", response="b"),
                           row(id="7", instruction="c", response="d"))
        assert seed_error(path).startswith(f"{path}:2: duplicate id '7' (first at {path}:1)")

    def test_not_utf8(self, tmp_path: Path) -> None:
        path = tmp_path / "s.jsonl"
        path.write_bytes(row(instruction="a", response="b").encode() + b'\n{"instruction": "\xff"}\n')
        assert seed_error(path).startswith(f"{path}:2: not UTF-8 text")

    def test_unreadable_parquet(self, tmp_path: Path) -> None:
        path = tmp_path / "s.parquet"
        path.write_bytes(b"this is not parquet at all")
        assert seed_error(path).startswith(f"{path}: cannot read as Parquet")

    def test_json_array_item_error_names_its_line(self, tmp_path: Path) -> None:
        path = tmp_path / "s.json"
        path.write_text('[\n {"instruction": "a", "response": "b"},\n 5\n]\n', encoding="utf-8")
        assert seed_error(path).startswith(f"{path}:3: expected a JSON object")

    def test_unknown_suffix(self, tmp_path: Path) -> None:
        path = write_lines(tmp_path / "s.txt", "hello")
        assert seed_error(path).startswith(f"{path}: unknown seeds format '.txt'")


# --------------------------------------------------------------------------- domains

TOPICS = {
    "cooking": ["bake", "oven", "flour", "sugar", "dough", "recipe", "butter"],
    "astronomy": ["planet", "orbit", "telescope", "galaxy", "comet", "star", "moon"],
    "sql": ["select", "join", "table", "index", "query", "column", "rows"],
}


def topical_seeds(per_topic: int = 12) -> tuple[list[Seed], dict[str, str]]:
    seeds, truth = [], {}
    for topic, words in TOPICS.items():
        for i in range(per_topic):
            rotated = words[i % 7 :] + words[: i % 7]
            seed_id = f"{topic}-{i}"
            seeds.append(Seed(seed_id, " ".join(rotated[:4]), " ".join(rotated[4:]), ""))
            truth[seed_id] = topic
    return seeds, truth


class TestDomains:
    def test_clusters_separable_topics_and_names_them_by_keywords(self) -> None:
        seeds, truth = topical_seeds()
        labelled = assign_domains(seeds, 3, seed=0)
        groups: dict[str, set[str]] = {}
        for s in labelled:
            groups.setdefault(s.domain, set()).add(truth[s.id])
        assert len(groups) == 3 and all(len(topics) == 1 for topics in groups.values())
        for name, topics in groups.items():
            (topic,) = topics
            parts = name.split("-")
            assert 1 <= len(parts) <= 3 and set(parts) <= set(TOPICS[topic])

    def test_deterministic(self) -> None:
        seeds = [Seed(s.id, s.instruction, s.response, "") for s in load_seeds(None, CFG)]
        assert assign_domains(seeds, 6, seed=3) == assign_domains(list(seeds), 6, seed=3)

    def test_keeps_given_domains_and_avoids_their_names(self) -> None:
        seeds, _ = topical_seeds(4)
        seeds[0] = Seed(seeds[0].id, seeds[0].instruction, seeds[0].response, "mine")
        out = assign_domains(seeds, 2, seed=1)
        assert out[0].domain == "mine"
        assert all(s.domain for s in out) and [s.id for s in out] == [s.id for s in seeds]

    def test_more_clusters_than_documents(self) -> None:
        seeds = [Seed("1", "bake bread", "oven", ""), Seed("2", "bake bread", "oven", "")]
        out = assign_domains(seeds, 8, seed=0)
        assert out[0].domain == out[1].domain != ""

    def test_domain_keywords(self) -> None:
        seeds, _ = topical_seeds()
        cooking = [Seed(s.id, s.instruction, s.response, "cooking") for s in seeds
                   if s.id.startswith("cooking")]
        words = planner_of(cooking, 0, 1).keywords("cooking", 0, 4)
        assert len(words) == 4 and set(words) <= set(TOPICS["cooking"])
        assert words == planner_of(list(reversed(cooking)), 0, 1).keywords("cooking", 0, 4)
        # A word every domain uses sinks below the domain's own.
        shared = [Seed(f"x{i}", "recipe planet", "recipe", "space") for i in range(3)]
        shared.append(Seed("y", "recipe oven", "", "kitchen"))
        assert planner_of(shared, 0, 1).keywords("kitchen", 0, 1) == ["oven"]


# --------------------------------------------------------------------------- planner


def first(planner: Planner, n: int, round: int = 0, start: int = 0) -> list[Task]:
    return list(itertools.islice(planner.tasks(round, start), n))


@pytest.fixture(scope="module")
def bundled() -> list[Seed]:
    return load_seeds(None, CFG)


class TestPlanner:
    def test_same_config_same_tasks_across_instances(self, bundled: list[Seed]) -> None:
        assert first(planner_of(bundled, 7, 3), 300) == first(planner_of(list(bundled), 7, 3), 300)

    def test_run_seed_and_round_change_the_plan(self, bundled: list[Seed]) -> None:
        base = first(planner_of(bundled, 7, 3), 50)
        assert base != first(planner_of(bundled, 8, 3), 50)
        assert [t.seed_ids for t in base] != [t.seed_ids for t in first(planner_of(bundled, 7, 3), 50, round=1)]

    def test_start_resumes_the_same_stream(self, bundled: list[Seed]) -> None:
        planner = planner_of(bundled, 1, 3)
        assert first(planner, 40, start=17) == first(planner, 57)[17:]

    def test_task_shape(self, bundled: list[Seed]) -> None:
        planner = planner_of(bundled, 0, 3)
        for i, task in enumerate(first(planner, 120, round=2)):
            assert task.id == f"r2-{i:07d}" and task.index == i and task.round == 2
            assert len(task.seed_ids) == 3 == len(set(task.seed_ids))
            assert all(planner.seed(s).domain == task.domain for s in task.seed_ids)

    def test_every_domain_once_per_cycle(self, bundled: list[Seed]) -> None:
        planner = planner_of(bundled, 5, 2)
        domains = planner.domains
        tasks = first(planner, len(domains) * 10)
        for c in range(10):
            cycle = tasks[c * len(domains) : (c + 1) * len(domains)]
            assert sorted(t.domain for t in cycle) == sorted(domains)

    def test_small_pool_and_zero_shot(self) -> None:
        seeds = [Seed("a", "i", "r", "x"), Seed("b", "i2", "r2", "y")]
        assert {t.seed_ids for t in first(planner_of(seeds, 0, 3), 10)} == {("a",), ("b",)}
        assert {t.seed_ids for t in first(planner_of(seeds, 0, 0), 10)} == {()}

    def test_add_seeds_joins_next_stream_not_the_running_one(self) -> None:
        planner = planner_of([Seed("a", "i", "r", "x")], 0, 2)
        running = planner.tasks(1)
        next(running)
        planner.add_seeds([Seed("b", "i2", "r2", "x"), Seed("c", "i3", "r3", "new")], 1)
        assert all(t.domain == "x" and t.seed_ids == ("a",) for t in itertools.islice(running, 20))
        fresh = first(planner, 20, round=1)
        assert {t.domain for t in fresh} == {"x", "new"}
        assert any(len(t.seed_ids) == 2 for t in fresh)
        assert {t.seed_ids for t in first(planner, 20, round=0)} == {("a",)}  # round 0's pool

    def test_add_seeds_is_idempotent_and_checks(self) -> None:
        seed = Seed("a", "i", "r", "x")
        planner = planner_of([seed], 0, 1)
        planner.add_seeds([seed], 1)
        assert len(planner) == 1
        with pytest.raises(ValueError, match="already used"):
            planner.add_seeds([Seed("a", "other", "r", "x")], 1)
        with pytest.raises(ValueError, match="no domain"):
            planner.add_seeds([Seed("b", "i", "r", "")], 1)
        with pytest.raises(KeyError):
            planner.seed("missing")
        assert len(planner) == 1  # a refused batch adds nothing

    def test_keywords_are_cached_and_refreshed(self, bundled: list[Seed]) -> None:
        planner = planner_of(bundled, 0, 3)
        before = planner.keywords("data-sql", 2, 5)
        assert "sql" in before and planner.keywords("data-sql", 2, 5) == before
        planner.add_seeds([Seed(f"z{i}", "zebra zebra", "zebra", "data-sql") for i in range(30)], 2)
        assert planner.keywords("data-sql", 2, 5)[0] == "zebra"
        assert planner.keywords("data-sql", 1, 5) == before  # round 1's pool has no zebra


# --------------------------------------------------------------------------- seed store


def numbered(n: int, domain: str = "d", start: int = 0) -> list[Seed]:
    return [Seed(f"s{i}", f"question {i}", f"answer {i}", domain) for i in range(start, start + n)]


class TestSeedStore:
    def test_positions_follow_joining_order_and_rounds_see_their_pool(self) -> None:
        store = SeedStore.of(numbered(3))
        store.add(numbered(2, start=3), joined=2)
        assert store.pool_sizes(1) == {"d": 3} and store.pool_sizes(2) == {"d": 5}
        assert store.ids_at("d", [4, 0, 3]) == ("s4", "s0", "s3")
        # A late seed of an earlier round joins the newest pool: positions stay in order.
        store.add([Seed("late", "q", "a", "d")], joined=1)
        assert store.pool_sizes(1) == {"d": 3} and store.ids_at("d", [5]) == ("late",)
        assert [s.id for s in store] == [f"s{i}" for i in range(5)] + ["late"]

    def test_frequencies_by_round(self) -> None:
        store = SeedStore.of([Seed("a", "zebra", "lion", "x"), Seed("b", "lion", "lion", "y")])
        store.add([Seed("c", "zebra", "zebra", "x")], joined=2)
        assert store.frequencies("x", 1) == ({"zebra": 1, "lion": 1}, 1, {"zebra": 1, "lion": 2}, 2)
        assert store.frequencies("x", 2) == ({"zebra": 2, "lion": 1}, 2, {"zebra": 2, "lion": 2}, 3)

    def test_run_directory_store_is_reused_by_key_and_rebuilt_otherwise(self, tmp_path: Path) -> None:
        seeds = write_lines(tmp_path / "s.jsonl", *(row(instruction=f"q{i}", response="a")
                                                    for i in range(5)))
        path = tmp_path / "run" / "seeds.sqlite"
        path.parent.mkdir()
        store = SeedStore.build(seeds, CFG, seed=0, path=path, key="k1")
        store.add([Seed("round-1", "q", "a", store.domains()[0])], joined=2)
        store.close()
        again = SeedStore.build(seeds, CFG, seed=0, path=path, key="k1")
        assert len(again) == 6  # reused as it was, the round's seed included
        again.close()
        rebuilt = SeedStore.build(seeds, CFG, seed=0, path=path, key="k2")
        assert len(rebuilt) == 5
        rebuilt.close()
        assert sorted(p.name for p in path.parent.iterdir()) == ["seeds.sqlite"]

    def test_a_damaged_store_is_rebuilt(self, tmp_path: Path) -> None:
        seeds = write_lines(tmp_path / "s.jsonl", row(instruction="q", response="a", domain="d"))
        path = tmp_path / "seeds.sqlite"
        path.write_bytes(b"this is not a database" * 100)
        store = SeedStore.build(seeds, CFG, seed=0, path=path, key="k")
        assert [s.id for s in store] == ["1"]
        store.close()

    def test_bad_seed_leaves_no_store(self, tmp_path: Path) -> None:
        seeds = write_lines(tmp_path / "s.jsonl", row(instruction="q", response="a"), "{oops")
        path = tmp_path / "seeds.sqlite"
        with pytest.raises(SeedError, match=":2: invalid JSON"):
            SeedStore.build(seeds, CFG, seed=0, path=path, key="k")
        assert list(tmp_path.iterdir()) == [seeds]

    def test_clustering_a_large_unlabelled_set_is_sampled_and_chunked(self) -> None:
        # More seeds than the fit sample and than one assignment chunk: every seed still
        # lands in one of a handful of domains, the same ones on a second build.
        seeds, truth = topical_seeds(2200)
        first_store, second_store = SeedStore.of(seeds, domains=3, seed=4), SeedStore.of(seeds, domains=3, seed=4)
        labelled = list(first_store)
        assert labelled == list(second_store)
        groups: dict[str, set[str]] = {}
        for s in labelled:
            groups.setdefault(s.domain, set()).add(truth[s.id])
        assert len(groups) == 3 and all(len(topics) == 1 for topics in groups.values())
