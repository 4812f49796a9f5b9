"""The project's error types: bad input, a failed download, a dead backend
process, an output that cannot be written."""



class FlairInputError(ValueError):
  """Bad input from the user: a flag, a file or a record.

  The message must name the flag, file or record and say what was expected;
  command-line entry points print it on one line and exit with status 1.
  """


class DownloadError(FlairInputError):
  """A download, unpack or verification step of download_dataset.py failed.

  The message is one line naming the URL, file or archive member and what to
  do; command-line use prints it as `error: <message>` and exits with status 1.
  """


class DownloadStopped(Exception):
  """A download or unpack worker saw its stop event set (another task failed
  or the user interrupted) and stopped quietly; the pipeline reports the first
  real error instead."""


class BackendDiedError(RuntimeError):
  """A process that runs FedAvg clients (the TFF worker, a Ray actor) died
  during a run, for instance killed by the kernel for lack of memory.
  Command-line entry points print it on one line and exit with status 1;
  rerunning a federated command resumes from its last checkpoint."""


class TffWorkerDiedError(BackendDiedError):
  """The TFF worker process died during a run (see `BackendDiedError`)."""


class OutputWriteError(RuntimeError):
  """An output file or directory could not be written: the disk is full, the
  file system is read-only, permission is denied or the device failed.

  The message names the path, the system's reason and what to do; nothing
  partial is left under the final name, so rerunning the same command after
  the cause is fixed resumes. Command-line entry points print it on one line
  and exit with status 1.
  """


class ClientDataError(Exception):
  """TensorFlow failed while training one client (its data could not be
  read or decoded). `client_id` names the client; `detail` is the first line
  of TensorFlow's message."""

  def __init__(self, client_id: str, detail: str):
    super().__init__(client_id, detail)
    self.client_id = client_id
    self.detail = detail

  def __str__(self) -> str:
    return f"client {self.client_id}: {self.detail}"
