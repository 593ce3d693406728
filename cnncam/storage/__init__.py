"""HDF5 storage of CAM exports: one part file per shard, merged into one virtual file.

See ``docs/hdf5-schema.md`` for the layout.  Typical use::

    spec = PartSpec.for_shard(run_info, n_total, shard, num_shards)
    with PartWriter.open_or_resume(cams_dir, spec, batch_size=64) as w:
        for batch in batches_from(w.state.next_index):   # skip if w.state.done
            w.put(batch)
    merge_parts([cams_dir / part_filename(i, n) for i in range(n)], cams_dir / MERGED_FILENAME)
    with open_cams(cams_dir / MERGED_FILENAME) as cams:
        for rows in cams.iter_rows(["samples/pred", cams.cam_name("gradcam", "layer4")]): ...
"""

from __future__ import annotations

from cnncam.storage.batch import PartBatch as PartBatch
from cnncam.storage.merge import PartStatus as PartStatus
from cnncam.storage.merge import merge_parts as merge_parts
from cnncam.storage.merge import part_status as part_status
from cnncam.storage.reader import CamFile as CamFile
from cnncam.storage.reader import open_cams as open_cams
from cnncam.storage.recover import ResumeState as ResumeState
from cnncam.storage.schema import MERGED_FILENAME as MERGED_FILENAME
from cnncam.storage.schema import SCHEMA_VERSION as SCHEMA_VERSION
from cnncam.storage.schema import RunInfo as RunInfo
from cnncam.storage.schema import cam_path as cam_path
from cnncam.storage.schema import metric_path as metric_path
from cnncam.storage.schema import part_filename as part_filename
from cnncam.storage.schema import shard_range as shard_range
from cnncam.storage.schema import upsampled_path as upsampled_path
from cnncam.storage.writer import PartSpec as PartSpec
from cnncam.storage.writer import PartWriter as PartWriter
