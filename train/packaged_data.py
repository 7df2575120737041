"""Prepares TFDS datasets offline from files that Debian packages install.

TFDS's `fashion_mnist` builder downloads four IDX files. Debian's
`dataset-fashion-mnist` installs the same images and labels, recompressed (so
their bytes, and TFDS's checksums, differ). We place each file in the builder's
download dir under the name TFDS derives from its URL and registered checksum,
so `download_and_prepare` finds it cached and never touches the network. The
result is the ordinary TFDS dataset (array_record), read by the same code path
as `imagenet2012`.

Usage: python -m train.packaged_data --data_dir=~/tensorflow_datasets
"""

from train import tf_setup  # First: TensorFlow loads without its C++ start-up lines.

# isort: split

import gzip
import json
import os
import shutil
import tempfile

from absl import flags
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums as tfds_checksums
from tensorflow_datasets.core.download import resource as tfds_resource

from train import command
from train import errors

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)
# IDX magic numbers and item counts: a wrong or truncated file fails here,
# not deep inside TFDS.
_IDX_HEADERS = {
    "train-images": (2051, 60_000), "train-labels": (2049, 60_000),
    "t10k-images": (2051, 10_000), "t10k-labels": (2049, 10_000),
}


def _check_idx_file(path):
  """Raises ValueError unless `path` is a complete gzip'd IDX file."""
  kind = os.path.basename(path).rsplit("-", 1)[0].replace("-idx3", "").replace("-idx1", "")
  magic, count = _IDX_HEADERS[kind]
  try:
    with gzip.open(path, "rb") as f:
      header = f.read(8)
      got_magic = int.from_bytes(header[:4], "big")
      got_count = int.from_bytes(header[4:8], "big")
      item_bytes = 28 * 28 if magic == 2051 else 1
      body = len(f.read()) - (8 if magic == 2051 else 0)
  except (OSError, EOFError) as e:
    raise errors.UserError(f"{path}: not a readable gzip IDX file ({e})") from e
  if (got_magic, got_count) != (magic, count) or body != count * item_bytes:
    raise errors.UserError(
        f"{path}: expected IDX magic {magic} with {count} items, got magic "
        f"{got_magic} with {got_count} items and {body} payload bytes")


def _stage_download(url, src, download_dir):
  """Copies `src` to where TFDS's DownloadManager looks for `url`'s file."""
  url_info = tfds_checksums.get_all_url_infos()[url]
  dst = os.path.join(download_dir, tfds_resource.get_dl_fname(url, url_info.checksum))
  shutil.copyfile(src, dst)
  with open(tfds_resource.get_info_path(tfds.core.Path(dst)), "w") as f:
    json.dump({"urls": [url], "original_fname": os.path.basename(src),
               "dataset_names": ["fashion_mnist"]}, f)


def prepare_fashion_mnist(data_dir=None, source_dir=DEBIAN_FASHION_MNIST_DIR):
  """Builds TFDS `fashion_mnist` (array_record) from the Debian IDX files.

  Idempotent: returns at once when the dataset is already prepared.
  Returns the dataset builder.
  """
  builder = tfds.builder("fashion_mnist", data_dir=data_dir,
                         file_format="array_record")
  if builder.is_prepared():
    return builder
  missing = [f for f in FASHION_MNIST_FILES
             if not os.path.exists(os.path.join(source_dir, f))]
  if missing:
    raise FileNotFoundError(
        f"{source_dir} lacks {missing}: install Debian's dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or pass --source_dir")
  for f in FASHION_MNIST_FILES:
    _check_idx_file(os.path.join(source_dir, f))
  with tempfile.TemporaryDirectory(prefix="stockpot_fmnist_") as download_dir:
    for f in FASHION_MNIST_FILES:
      _stage_download(builder.URL + f, os.path.join(source_dir, f), download_dir)
    print(f"[data] preparing fashion_mnist in {builder.data_dir} from {source_dir}", flush=True)
    builder.download_and_prepare(
        download_dir=download_dir,
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def main(argv):
  del argv
  tf_setup.hide_gpus_from_tensorflow()
  builder = prepare_fashion_mnist(flags.FLAGS.data_dir, flags.FLAGS.source_dir)
  print(f"fashion_mnist ready in {builder.data_dir}")


if __name__ == "__main__":
  flags.DEFINE_string("data_dir", None, "TFDS data dir (default: TFDS's own, "
                      "i.e. $TFDS_DATA_DIR or ~/tensorflow_datasets).")
  flags.DEFINE_string("source_dir", DEBIAN_FASHION_MNIST_DIR,
                      "Where the four Fashion-MNIST IDX .gz files are.")
  command.run(main)
