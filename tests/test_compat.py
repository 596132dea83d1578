"""launch/compat.py: every private API trainctl touches, checked against the packages installed here.

Real packages, no stand-ins: a Patch that names an attribute that is not there, or a
parameter it no longer takes, must stop with the package and the version found.
"""

from __future__ import annotations

import warnings

import pytest

from launch.compat import PATCHES, CompatError, Patch, require, version_tuple


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: f"{p.package}:{p.attribute}")
def test_every_declared_patch_checks_out_on_the_installed_packages(patch):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert require(patch) is not None
    assert not [w for w in caught if "outside the versions" in str(w.message)]  # tested here: in its range


def test_a_missing_private_attribute_stops_with_the_package_and_version():
    gone = Patch("hydra-core", ("1.3", "1.4"), "hydra._internal.hydra", "Hydra.no_such_method", why="a test")
    with pytest.raises(CompatError, match=r"hydra-core 1\.3\.\d+: hydra\._internal\.hydra\.Hydra\.no_such_method "
                                          r"is missing"):
        require(gone)
    changed = Patch("hydra-core", ("1.3", "1.4"), "hydra._internal.hydra", "Hydra.get_mode", ("no_such_arg",))
    with pytest.raises(CompatError, match="no longer takes"):
        require(changed)


def test_an_untested_version_whose_features_check_out_only_warns():
    old_range = Patch("hydra-core", ("1.1", "1.2"), "hydra._internal.hydra", "Hydra.get_mode",
                      ("config_name", "overrides"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert callable(require(old_range))
    assert any("outside the versions" in str(w.message) for w in caught)
    assert version_tuple("0.16.1rc2+cu12") == (0, 16, 1) and version_tuple("2.13.0+cpu") == (2, 13, 0)
