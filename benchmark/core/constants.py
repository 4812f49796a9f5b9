"""Names shared by every writer and reader of FLAIR data.

The values follow the FLAIR download layout and the per-user TFRecord format of
apple/ml-flair (see docs/formats.md, "Download layout" and "Per-user
TFRecords"). Nothing else in the project spells these strings out.
"""

# --- Downloaded dataset directory -------------------------------------------
METADATA_FILE = "labels_and_metadata.json"
LABEL_RELATIONSHIP_FILE = "label_relationship.txt"
SMALL_IMAGES_DIR = "small_images"
RAW_IMAGES_DIR = "raw_images"
IMAGE_EXTENSION = ".jpg"
# download_dataset.py's bookkeeping (completion markers, unpack staging).
DOWNLOAD_STATE_DIR = ".download_state"

# Keys of one record of labels_and_metadata.json.
USER_ID_KEY = "user_id"
IMAGE_ID_KEY = "image_id"
LABELS_KEY = "labels"
FINE_GRAINED_LABELS_KEY = "fine_grained_labels"
PARTITION_KEY = "partition"
REQUIRED_RECORD_KEYS = (USER_ID_KEY, IMAGE_ID_KEY, LABELS_KEY,
                        FINE_GRAINED_LABELS_KEY, PARTITION_KEY)

# --- Partitions ---------------------------------------------------------------
TRAIN = "train"
VAL = "val"
TEST = "test"
PARTITIONS = (TRAIN, VAL, TEST)
# Some texts and copies of the data call the validation partition "dev".
PARTITION_ALIASES = {"dev": VAL}

# --- Per-user TFRecords directory --------------------------------------------
TFRECORD_SUFFIX = ".tfrecords"
LABEL_INDEX_FILE = "label_index.json"
# The name the original ml-flair scripts wrote and read; accepted on input.
LEGACY_LABEL_INDEX_FILE = "label_to_index.json"
LABEL_INDEX_FILES = (LABEL_INDEX_FILE, LEGACY_LABEL_INDEX_FILE)

# tf.train.Example feature keys.
IMAGE_FEATURE = "image/encoded_jpeg"
LABELS_FEATURE = LABELS_KEY
FINE_GRAINED_LABELS_FEATURE = FINE_GRAINED_LABELS_KEY

# Decoded image shape: FLAIR's small images are 256x256 RGB.
IMAGE_SIZE = 256
IMAGE_CHANNELS = 3
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, IMAGE_CHANNELS)

# The 17 coarse labels, most frequent first (image counts of the full dataset,
# statistics.json computed from explore_labels.ipynb in apple/ml-flair).
COARSE_LABELS = (
    "structure", "equipment", "material", "outdoor", "plant", "food",
    "animal", "liquid", "art", "interior_room", "light", "recreation",
    "celebration", "fire", "music", "games", "religion",
)

# ImageNet channel statistics used by torchvision's ResNet-18 preprocessing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --- Trainer outputs in --save_model_dir (central and federated) -------------
FLAGS_FILE = "flags.json"
# What the run in a save directory is (trainer, label set, model, the settings
# that change results); see io_utils.claim_save_dir.
RUN_IDENTITY_FILE = "run.json"
METRICS_CSV_FILE = "metrics.csv"
FINAL_METRICS_FILE = "final_metrics.json"
TENSORBOARD_DIR = "tensorboard"
# Best weights by val loss; format with the network (--model_layout,
# "resnet18" by default), trainer="central"/"federated" and the number of
# model outputs (e.g. resnet18_central_17labels.h5): see
# training.run_dir.best_weights_path.
BEST_WEIGHTS_FILE_PATTERN = "{architecture}_{trainer}_{num_outputs}labels.h5"
# Central's Keras BackupAndRestore state and federated's checkpoints and TFF
# worker log (benchmark.central.BACKUP_DIR, benchmark.federated.CHECKPOINT_DIR
# and WORKER_LOG_FILE hold the same names).
CENTRAL_BACKUP_DIR = "backup"
FEDERATED_CHECKPOINT_DIR = "checkpoints"
FEDERATED_WORKER_LOG_FILE = "tff_worker.log"
# A command's log (library messages and TensorFlow's C++ lines that the
# console leaves out; see cli.console), in its results folder.
LOG_FILE = "log.txt"
# With --skip_bad_records: the TFRecords directory the run trains on (links
# to the good user files, copies of the bad ones without their bad records).
TFRECORDS_WITHOUT_BAD_RECORDS_DIR = "tfrecords_without_bad_records"
# Every name a trainer writes directly in --save_model_dir (plus the best
# weights, BEST_WEIGHTS_FILE_PATTERN): what --overwrite removes, and what
# makes a directory hold a run.
RUN_OUTPUT_NAMES = (FLAGS_FILE, RUN_IDENTITY_FILE, METRICS_CSV_FILE,
                    FINAL_METRICS_FILE, TENSORBOARD_DIR, CENTRAL_BACKUP_DIR,
                    FEDERATED_CHECKPOINT_DIR, FEDERATED_WORKER_LOG_FILE,
                    LOG_FILE,
                    TFRECORDS_WITHOUT_BAD_RECORDS_DIR)
# Default parent of a run's --save_model_dir (a fresh directory per run).
DEFAULT_RUNS_DIR = "runs"

# Where FedAvg rounds run (`federated_main --backend`; benchmark.backends says
# what each is). Here so that light modules (the demo) can name them without
# importing TensorFlow.
BACKEND_INPROCESS = "inprocess"
BACKEND_TFF_WORKER = "tff_worker"
BACKEND_RAY = "ray"
BACKENDS = (BACKEND_INPROCESS, BACKEND_TFF_WORKER, BACKEND_RAY)
