"""Copy the Google API protos the capibara protos import into a buf module folder.

googleapis-common-protos ships them as .proto files next to its Python modules, so nothing is
fetched from the Buf Schema Registry.
"""

import pathlib
import shutil
import sys

import google.api

NEEDED = ("annotations.proto", "http.proto", "httpbody.proto")


def main() -> None:
    source = pathlib.Path(list(google.api.__path__)[0])
    target = pathlib.Path(sys.argv[1]) / "google" / "api"
    shutil.rmtree(target.parent.parent, ignore_errors=True)
    target.mkdir(parents=True)
    for name in NEEDED:
        shutil.copy(source / name, target / name)


if __name__ == "__main__":
    main()
