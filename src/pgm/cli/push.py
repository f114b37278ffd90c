"""`pgm push`: a run or a pretrained directory published on the Hugging Face Hub (or, with
--folder, the folder that would be uploaded, written and nothing uploaded)."""

from __future__ import annotations

from ..errors import ArgumentError
from ..formats import DEFAULT_LICENSE, check_writable

UPLOAD_ONLY = {"private": "--private", "revision": "--revision", "token": "--token",
               "commit_message": "--commit-message"}  # what means nothing when nothing is uploaded


def register(commands) -> None:
    push = commands.add_parser("push", help="publish a run or a pretrained directory on the Hugging Face Hub")
    push.add_argument("source", metavar="RUN_OR_DIR", help="a training run (its latest checkpoint) or a pretrained "
                                                           "directory (save_pretrained's, pgm convert's)")
    push.add_argument("repo_id", metavar="REPO_ID", help="the Hub repository, OWNER/NAME (created when missing)")
    push.add_argument("--private", action="store_true", help="create the repository private (an existing repository "
                                                             "keeps its visibility)")
    push.add_argument("--revision", help="the branch to commit to, created from main when missing (default: main)")
    push.add_argument("--weights", choices=("ema", "raw"), help="a run's average or raw weights (default: the average "
                                                                "where there is one)")
    push.add_argument("--token", help="a Hub token with write access (default: huggingface_hub's saved login or "
                                      "$HF_TOKEN)")
    push.add_argument("--commit-message", help="the commit's message (default: which model and weights)")
    push.add_argument("--license", help="the license the model card's metadata gives the weights (default: the one "
                                        f"the directory's card records, else {DEFAULT_LICENSE}); weights trained by "
                                        "others keep their license")
    push.add_argument("--folder", metavar="DIR", help="write the folder that would be uploaded into DIR (new or "
                                                      "empty) and upload nothing")
    push.set_defaults(handler=cmd_push)


def cmd_push(args) -> int:
    from ..publish import push, write_folder

    if args.folder is not None:
        ignored = [flag for name, flag in UPLOAD_ONLY.items() if getattr(args, name) not in (None, False)]
        if ignored:
            raise ArgumentError(f"{', '.join(ignored)} {'apply' if len(ignored) > 1 else 'applies'} to an upload, and "
                                "--folder uploads nothing: leave out one or the other")
        check_writable(args.folder)
        done = write_folder(args.source, args.folder, args.repo_id, weights=args.weights, license=args.license)
        where = f"wrote {done.folder} for {done.repo_id} (nothing uploaded)"
    else:
        done = push(args.source, args.repo_id, private=args.private, revision=args.revision, weights=args.weights,
                    token=args.token, commit_message=args.commit_message, license=args.license)
        where = f"pushed {args.source} to {done.url} (revision {done.revision})"
    weights = f", {done.weights} weights" if done.weights else ""
    print(f"{where}: a {done.kind} model{weights}, {len(done.files)} files, {done.size / 1e6:.1f} MB")
    for name in done.files:
        print(f"  {name}")
    return 0
