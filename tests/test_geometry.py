import numpy as np
import cv2
import pytest

import uavloc as U


def test_scale_matches_cv2_resize_convention():
    # a bright 2x2 block at pixels 20-21, 10-11 becomes one pixel (10, 5) at half size
    img = np.zeros((40, 60), np.uint8)
    img[10:12, 20:22] = 255
    small = cv2.resize(img, (30, 20), interpolation=cv2.INTER_AREA)
    H = U.scale_h(0.5, 0.5)
    x, y = U.project(H, [(20.5, 10.5)])[0]
    assert abs(x - 10) < 1e-9 and abs(y - 5) < 1e-9 and small[5, 10] == 255
    assert np.allclose(U.project(np.linalg.inv(H), [(x, y)])[0], (20.5, 10.5))


@pytest.mark.parametrize("angle", [90, 180, 270, 30, -45])
def test_rotation_round_trip_and_pixel_placement(angle):
    img = np.zeros((48, 64), np.uint8)
    img[12, 40] = 255
    rot, m = U.rotate_image(img, angle)
    x, y = U.project(m, [(40, 12)])[0]
    if angle % 90 == 0:   # exact permutation: the bright pixel lands where the matrix says
        assert rot[int(round(y)), int(round(x))] == 255
    assert np.allclose(U.project(np.linalg.inv(m), [(x, y)])[0], (40, 12), atol=1e-9)
    corners = U.project(m, [(0, 0), (63, 0), (0, 47), (63, 47)])
    assert corners.min() > -0.5 and corners[:, 0].max() < rot.shape[1] - 0.5 + 1e-6


def test_jacobian_yaw_scale_of_known_similarity():
    a, s = np.deg2rad(35), 0.4
    H = np.array([[s * np.cos(a), -s * np.sin(a), 100], [s * np.sin(a), s * np.cos(a), 50], [0, 0, 1]])
    assert abs(U.homography_yaw(H, (10, 10)) - 35) < 1e-9
    assert abs(U.homography_scale(H, (10, 10)) - s) < 1e-9


def test_magsac_recovers_homography_with_noise_and_outliers():
    rng = np.random.default_rng(0)
    H = np.array([[0.9, -0.2, 30], [0.25, 0.95, -12], [1e-4, -5e-5, 1]])
    p0 = rng.uniform(0, 500, (300, 2))
    p1 = U.project(H, p0) + rng.normal(0, 0.5, (300, 2))
    p1[:90] = rng.uniform(0, 500, (90, 2))            # 30 % outliers
    g = U.GeometrySettings(ransac_threshold=3.0, ransac_confidence=0.999, ransac_max_iters=5000,
                           min_inliers=12, max_anisotropy=1.4)
    Hest, inl = U.estimate_homography(p0, p1, g)
    assert inl[90:].mean() > 0.95 and inl[:90].mean() < 0.1
    test = rng.uniform(0, 500, (50, 2))
    assert np.abs(U.project(Hest, test) - U.project(H, test)).max() < 1.0


def test_homography_checks_reject_mirror_scale_and_shear():
    g = (1.4, (0.67, 1.5))
    ok = np.diag([0.5, 0.5, 1.0])
    assert U.homography_problem(ok, (0, 0), 0.5, *g) is None
    assert "mirror" in U.homography_problem(np.diag([-0.5, 0.5, 1.0]), (0, 0), 0.5, *g)
    assert "scale" in U.homography_problem(ok, (0, 0), 1.5, *g)
    assert "scale" in U.homography_problem(ok, (0, 0), 0.3, *g)
    assert U.homography_problem(ok, (0, 0), 0.7, *g) is None      # 0.71x: inside [0.67, 1.5]
    assert "anisotropic" in U.homography_problem(np.diag([0.5, 0.2, 1.0]), (0, 0), 0.3, *g)


@pytest.mark.parametrize("tilt_deg, yaw_deg", [(0.0, 0.0), (3.4, 30.0), (8.0, 200.0)])
def test_camera_nadir_of_a_tilted_camera_is_exact(tilt_deg, yaw_deg):
    """A camera at (1200, 800), 500 map px above the map, tilted and yawed: the homography's nadir is
    the point below it, not the image centre's projection (which the tilt moves by 500 tan(tilt))."""
    K = np.array([[900.0, 0, 610], [0, 905.0, 455], [0, 0, 1]])
    a, b = np.radians(yaw_deg), np.radians(tilt_deg)
    yaw = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    R_cw = yaw @ tilt                        # camera axes in world coordinates (z into the ground)
    C = np.array([1200.0, 800.0, -500.0])
    R = R_cw.T                               # world -> camera
    t = -R @ C
    P = K @ np.c_[R[:, 0], R[:, 1], t]       # map plane (z = 0) -> image
    H = np.linalg.inv(P)                     # image -> map
    assert np.allclose(U.camera_nadir(H, K), C[:2], atol=1e-6)
    centre = U.project(H, [K[:2, 2]])[0]
    assert abs(np.hypot(*(centre - C[:2])) - 500 * np.tan(b)) < 1e-6
