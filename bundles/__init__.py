"""The shipped MONAI bundles. They install inside the package as ``monai_du.bundle_files`` (see
:mod:`monai_du.bundles`); ``monai-du bundle path NAME`` prints where."""
