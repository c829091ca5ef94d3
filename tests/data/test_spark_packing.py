"""How the Spark engine packs a log's files into tasks (pure logic; the engine itself is in test_spark_engine)."""

from recforge.data.spark.checked import pack_files


def test_files_stay_in_order_and_each_is_read_once() -> None:
    sizes = [7, 1, 300, 2, 2, 2, 90, 0, 5] * 50
    groups = pack_files(sizes, parallelism=2)
    assert [i for group in groups for i in group] == list(range(len(sizes)))
    assert all(groups)


def test_many_small_files_share_tasks_but_keep_every_core_busy() -> None:
    groups = pack_files([1_000] * 1_000, parallelism=2)
    assert len(groups) == 4  # two tasks per core, not one task per file
    assert {len(group) for group in groups} == {250}


def test_a_large_file_is_a_task_alone_and_tasks_stay_near_the_byte_target() -> None:
    mib = 1 << 20
    groups = pack_files([500 * mib, 1, 1, 60 * mib, 60 * mib, 60 * mib, 500 * mib], parallelism=16)
    assert groups[0] == [0] and groups[-1] == [6]
    sizes = [500 * mib, 1, 1, 60 * mib, 60 * mib, 60 * mib, 500 * mib]
    assert all(sum(sizes[i] for i in group) <= 128 * mib for group in groups[1:-1])


def test_empty_files_and_no_files() -> None:
    assert pack_files([0, 0, 0], parallelism=2) == [[0, 1, 2]]
    assert pack_files([], parallelism=2) == []
