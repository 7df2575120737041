"""The mesh from the config and parameter placement by path rules (8 fake CPU devices)."""

import jax
import numpy as np
import pytest

from train import sharding


def test_mesh_axes_from_config():
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 2)))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert sharding.make_mesh((("data", -1),), jax.devices()[:1]).size == 1
  with pytest.raises(ValueError, match=r"needs 16 devices, there are 8"):
    sharding.make_mesh((("data", 8), ("fsdp", 2)))
  with pytest.raises(ValueError, match="at most one axis may have size -1"):
    sharding.make_mesh((("data", -1), ("fsdp", -1)))


def test_rules_place_leaves_by_path():
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
  tree = {"params": {"Dense_0": {"kernel": np.zeros((6, 16)), "bias": np.zeros(16)},
                     "odd": {"kernel": np.zeros((3, 5))}},
          "opt_state": {"mu": {"Dense_0": {"kernel": np.zeros((6, 16))}}}}
  rules = ((".*/kernel", 'fsdp(axis="fsdp")'), (".*", "replicate"))
  shardings = sharding.tree_shardings(mesh, tree, rules)
  P = jax.sharding.PartitionSpec
  assert shardings["params"]["Dense_0"]["kernel"].spec == P(None, "fsdp")  # 16 is divisible by 4.
  assert shardings["opt_state"]["mu"]["Dense_0"]["kernel"].spec == P(None, "fsdp")
  assert shardings["params"]["Dense_0"]["bias"].spec == P()
  assert shardings["params"]["odd"]["kernel"].spec == P()  # No dimension divisible by 4.
  with pytest.raises(ValueError, match=r"no rule of config.param_sharding matches 'params/Dense_0/bias'"):
    sharding.tree_shardings(mesh, tree, ((".*/kernel", "replicate"),))
  with pytest.raises(ValueError, match=r"unknown op 'shard'"):
    sharding.tree_shardings(mesh, tree, ((".*", "shard"),))


def test_host_batches_become_global_arrays_split_over_all_axes():
  mesh = sharding.make_mesh((("data", 4), ("fsdp", 2)))
  batch = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  global_batch = sharding.to_global(batch, sharding.batch_sharding(mesh))
  assert len(global_batch["image"].sharding.device_set) == 8
  assert global_batch["image"].addressable_shards[0].data.shape == (2, 3)
  np.testing.assert_array_equal(sharding.to_host(global_batch)["image"], batch["image"])
