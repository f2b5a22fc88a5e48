from pathlib import Path

import numpy as np
import cv2
import pytest

import uavloc as U
from conftest import sift


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


@pytest.mark.parametrize("heading", [0.0, 30.0, 44.0, 90.0, 100.0, 180.0, -170.0, 260.0, -90.0, 315.5])
def test_a_view_turned_upright_points_its_x_axis_nearest_map_x(heading):
    """A frame whose image x-axis points `heading` on the map, its view turned by upright_turn: the
    view's x-axis points within 45 degrees of the map's (the sense of rotation_h's turns, which the
    links across legs rely on)."""
    c, s = np.cos(np.radians(heading)), np.sin(np.radians(heading))
    to_map = np.array([[c, -s, 500.0], [s, c, 300.0], [0, 0, 1]])
    m, _ = U.rotation_h(U.upright_turn(heading), 640, 480)
    yaw = U.homography_yaw(to_map @ np.linalg.inv(m), (100.0, 200.0))
    assert abs(yaw) <= 45 + 1e-9 and U.upright_turn(heading) in (0, 90, 180, 270)


@pytest.mark.parametrize("heading", [0.0, 100.0, -170.0, 44.0, -130.0, 260.0, 12.0])
def test_the_view_matched_against_the_map_is_turned_upright(heading):
    """The map is matched north up: the frame's view is turned by the quarter turn that brings it within
    20 degrees of north-up, or else to the degree; without a heading every quarter turn is tried."""
    c, s = np.cos(np.radians(heading)), np.sin(np.radians(heading))
    to_map = np.array([[c, -s, 500.0], [s, c, 300.0], [0, 0, 1]])
    (turn,) = U.turns_for(heading, 20)
    yaw = U.homography_yaw(to_map @ np.linalg.inv(U.rotation_h(turn, 640, 480)[0]), (100.0, 200.0))
    assert abs(yaw) <= (20 if turn % 90 == 0 else 0.5) + 1e-9, (turn, yaw)
    assert (turn % 90 == 0) == (abs(U.angle_diff(heading, -U.upright_turn(heading))) <= 20)
    assert sorted(U.turns_for(None, 20)) == [0, 90, 180, 270]
    assert sorted(U.turns_for(None, 20, diagonals=True)) == [0, 45, 90, 135, 180, 225, 270, 315]


@pytest.mark.parametrize("heading", [0.0, 30.0, -100.0, 180.0])
def test_a_window_at_a_known_heading_keeps_what_the_footprint_can_cover(heading):
    """A frame's footprint on the map, from an exact similarity (its heading as homography_yaw reads
    it): the points just inside its edges grown by `grow` image px are kept, those just outside are not,
    at every heading."""
    frame = U.Frame(1, None, 400, 300, 500.0, 500.0, 210.0, 140.0, "test")
    scale, a = 2.0, np.radians(heading)
    to_map = np.array([[scale * np.cos(a), -scale * np.sin(a), 1000.0],
                       [scale * np.sin(a), scale * np.cos(a), 600.0], [0, 0, 1]])
    assert abs(U.angle_diff(U.homography_yaw(to_map, frame.principal_point), heading)) < 1e-9
    centre = U.project(to_map, [frame.principal_point])[0]
    assert np.allclose(U.straight_down(frame, centre, heading, scale), to_map)
    grow = 25.0
    seen = U.covers(U.straight_down(frame, centre, heading, scale), frame.size, grow)
    # image points just inside and just outside the grown rectangle: its corners and edge midpoints
    for (x, y) in [(0, 0), (400, 0), (400, 300), (0, 300), (200, 0), (400, 150), (200, 300), (0, 150)]:
        out_x, out_y = np.sign(x - 200), np.sign(y - 150)
        inside = (x + out_x * (grow - 0.5), y + out_y * (grow - 0.5))
        outside = (x + out_x * (grow + 0.5), y + out_y * (grow + 0.5))
        kept = seen(U.project(to_map, [inside, outside]))
        assert kept.tolist() == [True, False], ((x, y), heading)
    assert seen(U.project(to_map, [(10.0, 280.0), frame.principal_point])).all()


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
                           min_inliers=12, max_anisotropy=1.4, scale_low=0.67, scale_high=1.5)
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


@pytest.mark.parametrize("lean", [(0.0, 0.06), (0.02, -0.05)])
def test_leveling_turns_a_leaning_camera_to_look_straight_down(lean):
    """A camera tilted so its nadir lies `lean` x f from the principal point: levelled, its view of the
    ground is a similarity (no perspective) and the nadir lands on the principal point."""
    f = U.Frame(1, None, 800, 600, 660.0, 660.0, 401.0, 299.0, "test")
    tilt = np.arctan(np.hypot(*lean))
    axis = np.array([-lean[1], lean[0], 0.0]) / np.hypot(*lean)          # the camera turned about this
    R = cv2.Rodrigues(axis * tilt)[0]
    C = np.array([500.0, 300.0, -400.0])
    P = f.K @ np.c_[R[:, 0], R[:, 1], -R @ C]                            # ground (z = 0) -> image, R world->camera
    H = np.linalg.inv(P)                                                 # image -> ground
    nadir = U.project(P, [C[:2]])[0]
    assert np.allclose(nadir, (f.cx + f.fx * lean[0], f.cy + f.fy * lean[1]), atol=1e-6)
    L = U.leveling(f, lean)
    assert np.allclose(U.project(L, [nadir])[0], f.principal_point, atol=1e-6)
    G = H @ np.linalg.inv(L)                                             # levelled px -> ground
    G /= G[2, 2]
    assert np.abs(G[2, :2]).max() < 1e-12 and abs(G[0, 0] - G[1, 1]) < 1e-9 and abs(G[0, 1] + G[1, 0]) < 1e-9


def leaning_camera(f, lean, heading_deg, centre):
    """Ground (z = 0, z down) -> image homography of a camera at `centre` whose nadir lies `lean` x f from
    its principal point, turned by `heading_deg` about the vertical."""
    tilt = np.arctan(np.hypot(*lean))
    axis = np.array([-lean[1], lean[0], 0.0]) / max(np.hypot(*lean), 1e-12)
    R = cv2.Rodrigues(axis * tilt)[0] @ cv2.Rodrigues(np.array([0, 0, np.radians(heading_deg)]))[0]
    C = np.asarray(centre, float)
    return f.K @ np.c_[R[:, 0], R[:, 1], -R @ C]


@pytest.mark.parametrize("lean_a, lean_b, heading_b", [((0.0, 0.06), (0.01, 0.045), 3.0),
                                                       ((0.02, 0.05), (-0.015, 0.07), 178.0)])
def test_a_link_carries_the_cameras_tilt_from_one_frame_to_the_next(lean_a, lean_b, heading_b):
    """Two leaning cameras over flat ground 300 units apart: from a's lean and the homography between the
    frames, b's lean comes back exactly (however the translation and the heading differ)."""
    f = U.Frame(1, None, 800, 600, 660.0, 660.0, 401.0, 299.0, "test")
    Pa = leaning_camera(f, lean_a, 0.0, (500.0, 300.0, -400.0))
    Pb = leaning_camera(f, lean_b, heading_b, (560.0, 40.0, -380.0))
    H = Pb @ np.linalg.inv(Pa)                                           # image a -> ground -> image b
    assert np.allclose(U.carried_lean(H, f, lean_a, f), lean_b, atol=1e-9)
    assert np.allclose(U.carried_lean(np.linalg.inv(H), f, lean_b, f), lean_a, atol=1e-9)


def test_a_heading_far_from_every_quarter_turn_turns_the_view_to_the_degree():
    """Within `exact_beyond` of a quarter turn the view its links use; beyond it, the turn that brings
    the frame north-up to the whole degree; all four quarter turns without a heading."""
    assert U.turns_for(None, 20) == [0, 180, 90, 270]
    assert U.turns_for(-92.0, 20) == [90] and U.turns_for(178.0, 20) == [180]
    assert U.turns_for(125.7, 20) == [234]                    # 35.7 degrees from the quarter turn 270
    assert U.turns_for(125.7, 40) == [270]


def test_keypoints_on_a_turned_views_empty_corners_are_dropped():
    """A 400 x 300 frame turned by 30 degrees: the view's middle lies on the frame, its corners on
    nothing, and a point 4 px inside the frame's edge is dropped (EMPTY_CORNER_MARGIN is 8 view px: 16
    image px in a view at half size)."""
    to_view, (w, h) = U.rotation_h(30, 400, 300)
    edge = U.project(to_view, [(200, 4), (200, 20), (200, 150)])
    corners = np.array([(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)], float)
    assert U.on_frame(edge, to_view, (400, 300)).tolist() == [False, True, True]
    assert not U.on_frame(corners, to_view, (400, 300)).any()
    half = U.scale_h(0.5, 0.5)                               # at half size the margin is 16 image px
    assert U.on_frame(U.project(to_view @ half, [(100, 12), (100, 20)]), to_view @ half, (400, 300)).tolist() \
        == [False, True]


def test_a_window_extracted_whole_finds_what_its_tiles_find_in_one_extraction(tmp_path):
    """Dark blobs on a flat map at known centres; a window across four 256 px tiles. Tiled, the four
    tiles are extracted; whole (--mode locate), the window once, kept for the next turn and cached on
    disk. Either way SIFT puts a keypoint within 0.5 map px of every blob inside the window, and none
    outside it."""
    s = sift("features.map_tile=256", "features.map_tile_pad=32")
    image = np.full((900, 1200), 160, np.uint8)
    centres = [(x, y) for x in range(40, 1200, 70) for y in range(40, 900, 70)]
    for x, y in centres:
        cv2.circle(image, (x, y), 4, 40, -1)
    image = cv2.GaussianBlur(image, (0, 0), 2)
    box = (200.0, 150.0, 480.0, 430.0)
    inside = np.array([c for c in centres if box[0] + 10 <= c[0] <= box[2] - 10 and box[1] + 10 <= c[1] <= box[3] - 10])
    backend = U.build_backend(s)

    def window(tiled: bool, folder: Path) -> tuple[np.ndarray, U.MapFeatures]:
        mf = U.MapFeatures(image, 1.0, backend, s.features, folder, U.Stopwatch(), tiled)
        feats, size, to_map = mf.window(box, 10_000)
        return U.project(to_map, feats.keypoints), mf

    for tiled, extractions in ((True, 4), (False, 1)):
        folder = tmp_path / f"tiled_{tiled}"
        folder.mkdir()
        xy, mf = window(tiled, folder)
        assert mf.extracted == extractions
        mf.window(box, 10_000)                                   # the next turn's search: nothing extracted
        assert mf.extracted == extractions
        assert ((xy >= box[:2]) & (xy < box[2:])).all()
        nearest = np.linalg.norm(inside[:, None, :] - xy[None, :, :], axis=2).min(axis=1)
        assert nearest.max() < 0.5, (tiled, nearest.max())
        again, mf = window(tiled, folder)                        # a later run: read from the disk cache
        assert mf.extracted == 0 and np.array_equal(again, xy)
