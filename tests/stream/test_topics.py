"""Kafka's default key partitioning, batched (stream.topics.key_partitions), against aiokafka's own."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.topics import key_partitions


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(st.binary(min_size=0, max_size=70), min_size=1, max_size=60),
       n=st.integers(min_value=1, max_value=64))
def test_same_partition_as_the_kafka_default_partitioner(keys, n):
    parts = list(range(n))
    assert key_partitions(keys, n) == [DefaultPartitioner()(k, parts, parts) for k in keys]


def test_card_ids_of_every_length_and_non_ascii():
    keys = [f"C{i:0{w}d}".encode() for w in range(0, 20) for i in range(50)] + ["卡号-001".encode(), b"\xff" * 7]
    parts = list(range(12))
    assert key_partitions(keys, 12) == [DefaultPartitioner()(k, parts, parts) for k in keys]
    assert len(set(key_partitions(keys, 12))) == 12   # spread over every partition
