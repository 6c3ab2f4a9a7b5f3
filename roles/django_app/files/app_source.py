#!/usr/bin/env python3
"""Controller-side helper of the django_app role (standard library only).

describe SRC   print JSON {name, version, digest, release}: the release id is the
               project's version plus a digest of everything that decides what the
               wheelhouse contains (the source files that are not excluded, the
               pinned requirements, the target interpreters and platforms), so any
               code or pin change gives a new release and the same input always
               gives the same id (wheel bytes would not: zip entries carry mtimes).
stage SRC DEST copy exactly the files the digest covers to DEST, so the wheel is
               built outside the source tree (no build/ or *.egg-info left there).
complete DIR   add to the wheel directory DIR the dependencies whose environment markers
               hold on some target interpreter but not on the controller's: pip evaluates
               markers with the Python it runs on, whatever --python-version says (e.g.
               redis-py needs async-timeout on Python < 3.11.3: Debian 12 has 3.11.2, the
               controller may have 3.11.7). Prints what it added, one per line.
"""

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile


def source_files(src, excludes):
    """Relative paths of the files under src whose path parts match no exclude glob, sorted."""
    found = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not any(fnmatch.fnmatch(d, pat) for pat in excludes))
        for name in files:
            if any(fnmatch.fnmatch(name, pat) for pat in excludes):
                continue
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            found.append(os.path.relpath(path, src))
    return sorted(found)


def describe(args):
    with open(os.path.join(args.src, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    for required in ("pyproject.toml", "requirements.txt"):
        if not os.path.isfile(os.path.join(args.src, required)):
            sys.exit(f"{args.src} has no {required}")
    digest = hashlib.sha256()
    digest.update(json.dumps({"python": sorted(args.python), "platform": sorted(args.platform)}).encode())
    for rel in source_files(args.src, args.exclude):
        digest.update(rel.encode() + b"\0")
        with open(os.path.join(args.src, rel), "rb") as handle:
            digest.update(hashlib.sha256(handle.read()).digest())
    short = digest.hexdigest()[: args.length]
    name = project["name"]
    version = project["version"]
    json.dump({"name": name, "version": version, "digest": short, "release": f"{version}-{short}"}, sys.stdout)


def stage(args):
    if os.path.exists(args.dest):
        sys.exit(f"{args.dest} exists")
    for rel in source_files(args.src, args.exclude):
        target = os.path.join(args.dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(args.src, rel), target)


def wheel_metadata(directory):
    """{canonical name: (version, [Requires-Dist])} of the wheels in directory."""
    from email.parser import HeaderParser

    from packaging.utils import canonicalize_name, parse_wheel_filename

    found = {}
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".whl"):
            continue
        project, version, _, _ = parse_wheel_filename(name)
        with zipfile.ZipFile(os.path.join(directory, name)) as wheel:
            meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
            headers = HeaderParser().parsestr(wheel.read(meta).decode("utf-8"))
        found[canonicalize_name(project)] = (version, headers.get_all("Requires-Dist") or [])
    return found


def marker_environments(pythons):
    """Marker environments of CPython on x86_64 Linux for every micro release of each target."""
    for python in pythons:
        for micro in range(0, 40):
            yield {
                "implementation_name": "cpython",
                "implementation_version": f"{python}.{micro}",
                "os_name": "posix",
                "platform_machine": "x86_64",
                "platform_python_implementation": "CPython",
                "platform_system": "Linux",
                "python_full_version": f"{python}.{micro}",
                "python_version": python,
                "sys_platform": "linux",
            }


def missing_requirements(directory, pythons, requirements_file):
    """Requirements some target may need (walking from the pins, with their extras) that no
    wheel in directory satisfies."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def applies(req, extras):
        if req.marker is None:
            return True
        return any(
            req.marker.evaluate(dict(env, extra=extra))
            for env in marker_environments(pythons)
            for extra in sorted(extras) + [""]
        )

    wheels = wheel_metadata(directory)
    with open(requirements_file) as handle:
        queue = [Requirement(line.split("#")[0].strip()) for line in handle if line.split("#")[0].strip()]
    seen, missing = set(), set()
    while queue:
        req = queue.pop()
        project = canonicalize_name(req.name)
        if (project, frozenset(req.extras)) in seen:
            continue
        seen.add((project, frozenset(req.extras)))
        have = wheels.get(project)
        if have is None or not req.specifier.contains(have[0], prereleases=True):
            req.marker = None
            missing.add(str(req))
            continue
        queue += [dep for dep in map(Requirement, have[1]) if applies(dep, req.extras)]
    return sorted(missing)


def complete(args):
    added = []
    for _ in range(5):
        missing = missing_requirements(args.src, args.python, os.path.join(args.src, "requirements.txt"))
        if not missing:
            for line in added:
                print(line)
            return
        for python in args.python:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                       "--implementation", "cp", "--python-version", python, "--abi", "cp" + python.replace(".", "")]
            command += [f"--platform={platform}" for platform in args.platform]
            subprocess.run(command + ["--dest", args.src, *missing], check=True)
        added += missing
    sys.exit(f"still missing after 5 rounds: {', '.join(missing)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["describe", "stage", "complete"])
    parser.add_argument("src")
    parser.add_argument("dest", nargs="?")
    parser.add_argument("--exclude", action="append", default=[], help="glob matched against file and directory names")
    parser.add_argument("--python", action="append", default=[], help="target interpreter version, e.g. 3.11")
    parser.add_argument("--platform", action="append", default=[], help="target wheel platform tag")
    parser.add_argument("--length", type=int, default=12, help="hex digits of the digest in the release id")
    args = parser.parse_args()
    if args.command == "stage" and not args.dest:
        parser.error("stage needs DEST")
    {"describe": describe, "stage": stage, "complete": complete}[args.command](args)


if __name__ == "__main__":
    main()
