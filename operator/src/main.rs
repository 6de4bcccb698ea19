fn main() {
    println!("tandem-operator: under construction");
}
