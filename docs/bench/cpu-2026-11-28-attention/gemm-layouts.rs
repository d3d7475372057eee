// A standalone crate (Cargo.toml: gemm = "0.19"): one block of 64 query rows against 4096 keys,
// head dimension 40, one thread; each product timed in the layouts compared. See attention-probe.txt.
use gemm::Parallelism;
use std::time::Instant;
// dst[m,n] (+)= beta * lhs[m,k] rhs[k,n], generic strides (row stride, col stride)
fn mm(dst: &mut [f32], dst_s: (isize, isize), (m, n, k): (usize, usize, usize), lhs: &[f32], ls: (isize, isize), rhs: &[f32], rs: (isize, isize), acc: bool) {
    unsafe { gemm::gemm(m, n, k, dst.as_mut_ptr(), dst_s.1, dst_s.0, acc, lhs.as_ptr(), ls.1, ls.0, rhs.as_ptr(), rs.1, rs.0, 1.0, 1.0, false, false, false, Parallelism::None) }
}
fn t<F: FnMut()>(name: &str, flops: f64, mut f: F) {
    f();
    let n = 64; let s = Instant::now(); for _ in 0..n { f(); } let e = s.elapsed().as_secs_f64() / n as f64;
    println!("{name:40} {:8.3} ms {:6.1} GFLOPS", e * 1e3, flops / e / 1e9);
}
fn main() {
    let (m, s, d) = (64usize, 4096usize, 40usize);
    let r = |n: usize| (0..n).map(|i| ((i * 7919 % 1000) as f32) / 1000.0 - 0.5).collect::<Vec<f32>>();
    let (q, k, v, g) = (r(m * d), r(s * d), r(s * d), r(m * d));
    let kt: Vec<f32> = (0..d * s).map(|i| k[(i % s) * d + i / s]).collect(); // [d, s]
    let vt: Vec<f32> = (0..d * s).map(|i| v[(i % s) * d + i / s]).collect();
    let mut p = r(m * s); let mut pt = r(m * s);
    let mut o = vec![0f32; m * d]; let mut dk = vec![0f32; s * d]; let mut dkt = vec![0f32; s * d];
    let f = 2.0 * (m * s * d) as f64;
    // scores p[m,s] = q k^T
    t("S = q k^T  (k [s,d])", f, || mm(&mut p, (s as isize, 1), (m, s, d), &q, (d as isize, 1), &k, (1, d as isize), false));
    t("S = q k^T  (kT [d,s])", f, || mm(&mut p, (s as isize, 1), (m, s, d), &q, (d as isize, 1), &kt, (s as isize, 1), false));
    t("S^T = k q^T into pt [s,m]", f, || mm(&mut pt, (m as isize, 1), (s, m, d), &k, (d as isize, 1), &q, (1, d as isize), false));
    t("S col-major dst (pt as [s,m])", f, || mm(&mut pt, (1, m as isize), (m, s, d), &q, (d as isize, 1), &k, (1, d as isize), false));
    // out[m,d] = p v
    t("O = P v (v [s,d])", f, || mm(&mut o, (d as isize, 1), (m, d, s), &p, (s as isize, 1), &v, (d as isize, 1), false));
    t("O = P v (vT [d,s])", f, || mm(&mut o, (d as isize, 1), (m, d, s), &p, (s as isize, 1), &vt, (1, s as isize), false));
    t("O col-major dst", f, || mm(&mut o, (1, m as isize), (m, d, s), &p, (s as isize, 1), &v, (d as isize, 1), false));
    t("O = P^T-stored v", f, || mm(&mut o, (d as isize, 1), (m, d, s), &pt, (1, m as isize), &v, (d as isize, 1), false));
    // dv[s,d] += P^T g
    t("dV += P^T g", f, || mm(&mut dk, (d as isize, 1), (s, d, m), &p, (1, s as isize), &g, (d as isize, 1), true));
    t("dV += (pt) g", f, || mm(&mut dk, (d as isize, 1), (s, d, m), &pt, (m as isize, 1), &g, (d as isize, 1), true));
    t("dV^T += g^T P  (dvT [d,s])", f, || mm(&mut dkt, (s as isize, 1), (d, s, m), &g, (1, d as isize), &p, (s as isize, 1), true));
    // dP[m,s] = g v^T
    t("dP = g v^T", f, || mm(&mut p, (s as isize, 1), (m, s, d), &g, (d as isize, 1), &v, (1, d as isize), false));
    t("dP = g vT", f, || mm(&mut p, (s as isize, 1), (m, s, d), &g, (d as isize, 1), &vt, (s as isize, 1), false));
    // dq[m,d] = dS k
    t("dq = dS k", f, || mm(&mut o, (d as isize, 1), (m, d, s), &p, (s as isize, 1), &k, (d as isize, 1), false));
    t("dq = dS kT", f, || mm(&mut o, (d as isize, 1), (m, d, s), &p, (s as isize, 1), &kt, (1, s as isize), false));
    // dk[s,d] += dS^T q
    t("dK += dS^T q", f, || mm(&mut dk, (d as isize, 1), (s, d, m), &p, (1, s as isize), &q, (d as isize, 1), true));
    t("dK^T += q^T dS", f, || mm(&mut dkt, (s as isize, 1), (d, s, m), &q, (1, d as isize), &p, (s as isize, 1), true));
    t("dPt = v g^T into [s,m]", f, || mm(&mut pt, (m as isize, 1), (s, m, d), &v, (d as isize, 1), &g, (1, d as isize), false));
    let fb = f * 5.0; let ff = f * 2.0;
    t("OLD fwd (S, O)", ff, || { mm(&mut p, (s as isize, 1), (m, s, d), &q, (d as isize, 1), &k, (1, d as isize), false); mm(&mut o, (d as isize, 1), (m, d, s), &p, (s as isize, 1), &v, (d as isize, 1), false); });
    t("NEW fwd (St, O)", ff, || { mm(&mut pt, (m as isize, 1), (s, m, d), &k, (d as isize, 1), &q, (1, d as isize), false); mm(&mut o, (d as isize, 1), (m, d, s), &pt, (1, m as isize), &v, (d as isize, 1), false); });
    t("OLD bwd", fb, || {
        mm(&mut p, (s as isize, 1), (m, s, d), &q, (d as isize, 1), &k, (1, d as isize), false);
        mm(&mut dk, (d as isize, 1), (s, d, m), &p, (1, s as isize), &g, (d as isize, 1), true);
        mm(&mut p, (s as isize, 1), (m, s, d), &g, (d as isize, 1), &v, (1, d as isize), false);
        mm(&mut o, (d as isize, 1), (m, d, s), &p, (s as isize, 1), &k, (d as isize, 1), false);
        mm(&mut dk, (d as isize, 1), (s, d, m), &p, (1, s as isize), &q, (d as isize, 1), true);
    });
    t("NEW bwd", fb, || {
        mm(&mut pt, (m as isize, 1), (s, m, d), &k, (d as isize, 1), &q, (1, d as isize), false);
        mm(&mut dk, (d as isize, 1), (s, d, m), &pt, (m as isize, 1), &g, (d as isize, 1), true);
        mm(&mut pt, (m as isize, 1), (s, m, d), &v, (d as isize, 1), &g, (1, d as isize), false);
        mm(&mut o, (d as isize, 1), (m, d, s), &pt, (1, m as isize), &k, (d as isize, 1), false);
        mm(&mut dkt, (d as isize, 1), (s, d, m), &pt, (m as isize, 1), &q, (d as isize, 1), true);
    });
    t("O = Pt^T v rowmajor dst", f, || mm(&mut o, (d as isize, 1), (m, d, s), &pt, (1, m as isize), &v, (d as isize, 1), false));
    t("O = Pt^T v colmajor dst", f, || mm(&mut o, (1, m as isize), (m, d, s), &pt, (1, m as isize), &v, (d as isize, 1), false));
    t("dV += Pt g rowmajor", f, || mm(&mut dk, (d as isize, 1), (s, d, m), &pt, (m as isize, 1), &g, (d as isize, 1), true));
    t("dV += Pt g colmajor", f, || mm(&mut dkt, (1, s as isize), (s, d, m), &pt, (m as isize, 1), &g, (d as isize, 1), true));
    t("dV += Pt g colmajor, g^T stored", f, || mm(&mut dkt, (1, s as isize), (s, d, m), &pt, (m as isize, 1), &q, (1, m as isize), true));
    let mut ot = vec![0f32; m * d];
    t("O^T = v^T Pt  [d,m]", f, || mm(&mut ot, (m as isize, 1), (d, m, s), &v, (1, d as isize), &pt, (m as isize, 1), false));
    t("O = Pt^T v (again)", f, || mm(&mut o, (d as isize, 1), (m, d, s), &pt, (1, m as isize), &v, (d as isize, 1), false));
    let _ = (&mut pt, &dkt);
}
